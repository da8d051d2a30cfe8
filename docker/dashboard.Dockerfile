# The fleet dashboard (read-only web UI over the store). Build from the repository root:
#   docker build -f docker/dashboard.Dockerfile -t fleet-dashboard .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The one version file every part's VERSION links to, and the lock it installs with.
COPY VERSION constraints.txt /src/
COPY common /src/common
COPY store /src/store
COPY fleetctl /src/fleetctl
COPY dashboard /src/dashboard
RUN pip install -c /src/constraints.txt /src/common /src/store /src/fleetctl /src/dashboard && rm -rf /src \
 && useradd --system --create-home --home-dir /var/lib/fleet fleet

USER fleet
WORKDIR /var/lib/fleet
# 0.0.0.0: reachable from outside the container (compose publishes it on the host's loopback only).
ENV FLEET_DASHBOARD_HOST=0.0.0.0 \
    FLEET_DASHBOARD_PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["fleet-dashboard", "--check"]
CMD ["fleet-dashboard"]
