# The fleet agent: slim Python, only the agent's own dependencies (paho-mqtt, psutil, PyYAML).
# Build from the repository root:  docker build -f docker/agent.Dockerfile -t fleet-agent .
# In a container the agent reports the container's view of the host unless it shares the
# host's namespaces (docker run --pid host ...); on real hosts use the systemd unit instead.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The one version file every part's VERSION links to, and the lock it installs with.
COPY VERSION constraints.txt /src/
COPY common /src/common
COPY agent /src/agent
RUN pip install -c /src/constraints.txt /src/common /src/agent && rm -rf /src \
 && useradd --system --create-home --home-dir /var/lib/fleet-agent fleet

USER fleet
WORKDIR /var/lib/fleet-agent
ENV FLEET_AGENT_OUTBOX_PATH=/var/lib/fleet-agent/outbox.db \
    FLEET_AGENT_HEARTBEAT_PATH=/var/lib/fleet-agent/heartbeat.json

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["fleet-agent", "--check"]
CMD ["fleet-agent"]
