"""site_worker."""
