# Assay tasks. On a fresh machine run them through ./just, which makes .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
bin := justfile_directory() / ".venv/bin"

# list the recipes
default:
    @{{bin}}/just --list

# a whole federated benchmark on this machine (images, keys, platform, every role, leaderboard)
demo *ARGS:
    {{bin}}/assay demo {{ARGS}}

# start the platform (nats-server, four services, a worker per site); Ctrl-C stops it
up:
    {{bin}}/assay up

# the whole test suite: unit, service, integration (real nats-server, Docker, PostgreSQL) and end to end
test *ARGS:
    {{bin}}/python -m pytest -q -p no:cacheprovider {{ARGS}}

# the fast part: no Docker, no PostgreSQL
test-fast:
    {{bin}}/python -m pytest -q -m "not docker and not postgres"

# speed benchmarks; writes bench-results/*.json and BENCHMARKS.md
bench *ARGS:
    {{bin}}/python tests/bench/bench.py {{ARGS}}

# regenerate the committed JSON Schema of every message
schema:
    {{bin}}/python -m contracts.schema

# regenerate the committed AsyncAPI 3.0 document of the whole platform (contracts/asyncapi/assay.json)
asyncapi:
    {{bin}}/python -m assay.asyncapi
