#!/usr/bin/env bash
# One database and one login role per Assay service (services never share a database: DESIGN.md).
# The postgres image runs this once, on an empty data volume; each role may connect to its own database only.
set -e

for service in registry approval scheduling leaderboard; do
  var="POSTGRES_${service^^}_PASSWORD"
  password="${!var:?$var is not set: see compose/.env.example}"
  psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
       --set=service="$service" --set=password="$password" <<'SQL'
CREATE ROLE :"service" LOGIN PASSWORD :'password';
CREATE DATABASE :"service" OWNER :"service";
REVOKE ALL ON DATABASE :"service" FROM PUBLIC;
SQL
done
