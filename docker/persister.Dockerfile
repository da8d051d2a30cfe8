# The fleet persister, with fleetctl for queries inside the container
# (docker compose exec persister fleetctl status). Build from the repository root:
#   docker build -f docker/persister.Dockerfile -t fleet-persister .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The one version file every part's VERSION links to, and the lock it installs with.
COPY VERSION constraints.txt /src/
COPY common /src/common
COPY store /src/store
COPY persister /src/persister
COPY fleetctl /src/fleetctl
RUN pip install -c /src/constraints.txt /src/common /src/store /src/persister /src/fleetctl && rm -rf /src \
 && useradd --system --create-home --home-dir /var/lib/fleet fleet

USER fleet
WORKDIR /var/lib/fleet
ENV FLEET_PERSISTER_METRICS_HOST=0.0.0.0 \
    FLEET_PERSISTER_HEARTBEAT_PATH=/var/lib/fleet/fleet-persister.heartbeat.json \
    FLEET_PERSISTER_SQLITE_PATH=/var/lib/fleet/fleet.db
EXPOSE 9812

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["fleet-persister", "--check"]
CMD ["fleet-persister"]
