#!/bin/sh
# layerline's one entrypoint, for the container image and for a plain shell alike.
#
#   entrypoint.sh stage ARGS...            stage-server ARGS  (--model $LAYERLINE_MODEL first, when set)
#   entrypoint.sh coordinator CMD ARGS...  coordinator CMD ARGS  (serve / launch-local: --model $LAYERLINE_MODEL first)
#   entrypoint.sh fetch-model [NAME]       coordinator fetch-model NAME (default $LAYERLINE_MODEL)
#   entrypoint.sh certs ARGS...            coordinator certs ARGS
#   entrypoint.sh health HOST:PORT [--tls-ca F --tls-cert F --tls-key F]
#                                          exit 0 when the server answers SERVING on grpc.health.v1
#
# Environment: LAYERLINE_PYTHON (the interpreter, default python3: point it at a virtual environment's
# python to run from a checkout), LAYERLINE_MODEL (a known model name or a directory), and what the
# commands read themselves: LAYERLINE_CACHE (the model cache), LAYERLINE_API_KEY (a client's key).
# A --model among ARGS wins over LAYERLINE_MODEL: the command line takes the last one given.
set -eu

python=${LAYERLINE_PYTHON:-python3}

usage() {
    echo "usage: $0 stage|coordinator|fetch-model|certs|health [ARGS...]" >&2
    exit 2
}

[ "$#" -ge 1 ] || usage
role=$1
shift

case "$role" in
    stage)
        if [ -n "${LAYERLINE_MODEL:-}" ]; then
            set -- --model "$LAYERLINE_MODEL" "$@"
        fi
        exec "$python" -m stage_server.cli "$@"
        ;;
    coordinator)
        if [ "$#" -ge 1 ] && [ -n "${LAYERLINE_MODEL:-}" ]; then
            case "$1" in
                serve|launch-local)
                    command=$1
                    shift
                    set -- "$command" --model "$LAYERLINE_MODEL" "$@"
                    ;;
            esac
        fi
        exec "$python" -m coordinator.cli "$@"
        ;;
    fetch-model)
        name=${1:-${LAYERLINE_MODEL:-}}
        [ -n "$name" ] || { echo "$0 fetch-model: name a model or set LAYERLINE_MODEL" >&2; exit 2; }
        [ "$#" -eq 0 ] || shift
        exec "$python" -m coordinator.cli fetch-model "$name" "$@"
        ;;
    certs)
        exec "$python" -m coordinator.cli certs "$@"
        ;;
    health)
        exec "$python" -m coordinator.health_check "$@"
        ;;
    -h|--help|help)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "$0: unknown role '$role'" >&2
        usage
        ;;
esac
