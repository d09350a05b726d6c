# The bastion, plus the consul CLI for deploy/bootstrap-acl.sh.
FROM hashicorp/consul:1.20 AS consul
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends openssh-client curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /var/lib/bastion bastion
COPY --from=consul /bin/consul /usr/local/bin/consul
COPY pyproject.toml README.md /opt/bastion/
COPY bastion /opt/bastion/bastion
COPY acl-policies /opt/bastion/acl-policies
COPY deploy /opt/bastion/deploy
RUN python -m venv /opt/bastion/venv && /opt/bastion/venv/bin/pip install --no-cache-dir /opt/bastion
ENV PATH=/opt/bastion/venv/bin:$PATH
ENTRYPOINT ["bastion"]
