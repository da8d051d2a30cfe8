# The fleet controller. Build from the repository root:
#   docker build -f docker/controller.Dockerfile -t fleet-controller .
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The one version file every part's VERSION links to, and the lock it installs with.
COPY VERSION constraints.txt /src/
COPY common /src/common
COPY controller /src/controller
RUN pip install -c /src/constraints.txt /src/common /src/controller && rm -rf /src \
 && useradd --system --create-home --home-dir /var/lib/fleet fleet

USER fleet
WORKDIR /var/lib/fleet
# Metrics are off unless FLEET_CONTROLLER_METRICS_ENABLED=true; 0.0.0.0 so Prometheus can scrape.
ENV FLEET_CONTROLLER_METRICS_HOST=0.0.0.0 \
    FLEET_CONTROLLER_HEARTBEAT_PATH=/var/lib/fleet/fleet-controller.heartbeat.json
EXPOSE 9811

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["fleet-controller", "--check"]
CMD ["fleet-controller"]
