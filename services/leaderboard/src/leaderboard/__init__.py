"""The leaderboard service: verifies signed site results, binds them to their job, aggregates and ranks them."""
