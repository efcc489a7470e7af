"""The scheduling service: plans the jobs of approved pairs and sends each, signed, to its site's queue."""
