#!/usr/bin/env bash
# Rebuild and start the development stack: the gateway plus a real Orthanc PACS.
set -euo pipefail
cd "$(dirname "$0")"

COMPOSE_FILE=docker-compose-development.yml
mkdir -p INPUT OUTPUT

docker compose -f "$COMPOSE_FILE" down
docker compose -f "$COMPOSE_FILE" build
docker compose -f "$COMPOSE_FILE" up -d

cat <<MSG
Development stack is up.
  Drop studies into:   ./INPUT/gateway_<id>/<StudyInstanceUID>/*.dcm  (plus the gateway's image.db)
  Results appear in:   ./OUTPUT/gateway_<id>/
  Orthanc (PACS) UI:   http://localhost:8042   (DICOM: localhost:4242, AE title ORTHANC)
  Gateway logs:        docker compose -f $COMPOSE_FILE logs -f gateway
  Stop:                docker compose -f $COMPOSE_FILE down
MSG
