"""What every service is built from: the bus edge, the database with its outbox and inbox, signed actors."""
