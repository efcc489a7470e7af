"""The site worker: at the hospital, it runs its site's jobs in a sandbox and sends back signed metrics only."""
