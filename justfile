# Assay tasks. On a fresh machine run them through ./just, which makes .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
bin := justfile_directory() / ".venv/bin"

# list the recipes
default:
    @{{bin}}/just --list

# a whole federated benchmark on this machine (images, keys, platform, every role, leaderboard)
demo *ARGS:
    {{bin}}/assay demo {{ARGS}}

# start the platform (nats-server, four services, a worker per site); Ctrl-C stops it; takes `assay up` options
# (just up --cluster 3 --replicas 2 --postgres URL)
up *ARGS:
    {{bin}}/assay up {{ARGS}}

# the platform's images (assay-central:dev, assay-site:dev): a local Debian base, a wheelhouse made here, docker build
# --network none; takes `assay images build` options (just images --image site)
images *ARGS:
    {{bin}}/assay images build {{ARGS}}

# the whole suite: unit, service, integration (real nats-server, Docker, PostgreSQL), e2e; two workers; pytest args
test *ARGS:
    {{bin}}/python -m pytest -q -p no:cacheprovider -n 2 {{ARGS}}

# the fast part: no Docker, no PostgreSQL; takes pytest arguments too (just test-fast tests/service -x)
test-fast *ARGS:
    {{bin}}/python -m pytest -q -p no:cacheprovider -m "not docker and not postgres" {{ARGS}}

# speed benchmarks; writes bench-results/*.json and BENCHMARKS.md
bench *ARGS:
    {{bin}}/python tests/bench/bench.py {{ARGS}}

# regenerate the committed JSON Schema of every message
schema:
    {{bin}}/python -m contracts.schema

# regenerate the committed AsyncAPI 3.0 document of the whole platform (contracts/asyncapi/assay.json)
asyncapi:
    {{bin}}/python -m assay.asyncapi
