"""service_kit."""
