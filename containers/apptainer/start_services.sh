#!/usr/bin/env bash
# Start, check or stop the PyAceMaker services as Apptainer instances on one node of an HPC cluster (a login
# or service node where long-running processes are allowed), with the oracle submitting its DFT calculations
# as Slurm array jobs from inside its instance. See docs/deployment.md ("Apptainer and Slurm").
#
# usage: containers/apptainer/start_services.sh start|status|stop
#
# Prerequisites: the .sif files, built from the OCI images (see containers/apptainer/*.def):
#   make apptainer-archives            # on a machine with podman; copy build/containers/archives/*.tar over
#   for d in orchestrator sampler oracle-qe trainer; do
#     apptainer build "$PYACEMAKER_SIF_DIR/pyacemaker-$d.sif" "containers/apptainer/$d.def"; done
#
# Settings (environment variables):
#   PYACEMAKER_HOME        shared directory, visible at the same path on the compute nodes: artifact store,
#                          the oracle's task dirs and job table, the trainer's jobs (default: ~/.pyacemaker)
#   PYACEMAKER_SIF_DIR     directory of the .sif files (default: build/containers/sif)
#   PYACEMAKER_SERVICES    services to start (default: "oracle sampler trainer orchestrator")
#   PYACEMAKER_ORACLE_IMAGE  oracle image: oracle (lj/xtb/pyscf), oracle-qe, oracle-mace (default: oracle-qe)
#   PYACEMAKER_BIND        interface the services listen on (default: 127.0.0.1). Any other interface exposes
#                          them: then also set PYACEMAKER_TLS_CERT/KEY/CA and PYACEMAKER_TOKEN_FILE.
#   PYACEMAKER_PORT_BASE   orchestrator port; sampler, oracle and trainer take the next three (default: 50051)
#   PYACEMAKER_SLURM_BINDS comma-separated host paths the oracle instance needs for sbatch/squeue/scancel/sacct
#                          (binaries, their libraries, slurm.conf, the munge socket); default: Debian's layout
#   PYACEMAKER_TLS_*, PYACEMAKER_TOKEN_FILE   passed to every instance (their files are bound read-only)
#   PYACEMAKER_ORACLE_DEPLOYMENT  the oracle's deployment file (qe/vasp profiles, job template, scratch dirs; see
#                          docs/deployment.md), bound read-only into the oracle instance (default:
#                          $PYACEMAKER_HOME/oracle-deployment.yaml, written at the first start when absent)
#   PYACEMAKER_LABELLING_ORACLES  space-separated HOST:PORT of extra oracle instances (oracle-mace, e.g. one per
#                          GPU node, on the same PYACEMAKER_HOME) that step 5 spreads its shards over
#   PYACEMAKER_APPTAINER   the apptainer command (default: apptainer; "echo" prints the commands: a dry run)
#
# The oracle's Slurm array tasks must run inside the same image: the default deployment file written here sets
#   executors: {slurm: {template: $PYACEMAKER_HOME/slurm_task.sh}}
# (a copy of containers/apptainer/slurm_task.sh; the job inherits PYACEMAKER_ORACLE_SIF and PYACEMAKER_HOME from
# the oracle instance). A run config then selects it with oracle: {executor: {kind: slurm, ...}}.
#
# After `start`, `source "$PYACEMAKER_HOME/apptainer.env"` points the pyacemaker CLI at the instances.
set -euo pipefail

action=${1:-}
home=${PYACEMAKER_HOME:-$HOME/.pyacemaker}
sif_dir=${PYACEMAKER_SIF_DIR:-build/containers/sif}
services=${PYACEMAKER_SERVICES:-oracle sampler trainer orchestrator}
oracle_image=${PYACEMAKER_ORACLE_IMAGE:-oracle-qe}
bind_host=${PYACEMAKER_BIND:-127.0.0.1}
port_base=${PYACEMAKER_PORT_BASE:-50051}
apptainer=${PYACEMAKER_APPTAINER:-apptainer}
slurm_binds=${PYACEMAKER_SLURM_BINDS:-/etc/slurm,/run/munge,/usr/bin/sbatch,/usr/bin/squeue,/usr/bin/scancel,/usr/bin/sacct,/usr/lib/x86_64-linux-gnu/slurm-wlm}
health_timeout=${PYACEMAKER_HEALTH_TIMEOUT:-120}
oracle_deployment=${PYACEMAKER_ORACLE_DEPLOYMENT:-$home/oracle-deployment.yaml}
script_dir=$(dirname "$(realpath "$0")")
# Where the services reach each other and the CLI reaches them (instances share the node's network).
peer_host=$bind_host
if [ "$bind_host" = 0.0.0.0 ]; then peer_host=127.0.0.1; fi
security_files=(PYACEMAKER_TLS_CERT PYACEMAKER_TLS_KEY PYACEMAKER_TLS_CA PYACEMAKER_TLS_CLIENT_CERT PYACEMAKER_TLS_CLIENT_KEY PYACEMAKER_TOKEN_FILE)
security_values=(PYACEMAKER_TLS_CLIENT_AUTH PYACEMAKER_TLS_SERVER_NAME)

port_of() {
  case $1 in
    orchestrator) echo "$port_base" ;;
    sampler) echo $((port_base + 1)) ;;
    oracle) echo $((port_base + 2)) ;;
    trainer) echo $((port_base + 3)) ;;
    *) echo "unknown service: $1" >&2; return 1 ;;
  esac
}

image_of() {
  if [ "$1" = oracle ]; then echo "$sif_dir/pyacemaker-$oracle_image.sif"; else echo "$sif_dir/pyacemaker-$1.sif"; fi
}

instance_of() { echo "pyacemaker-$1"; }

# Options every instance gets: a clean environment with only our settings, the shared home at its own path.
common_options() {
  local service=$1 options=(--cleanenv --bind "$home")
  options+=(--env "PYACEMAKER_PORT=$(port_of "$service")" --env "PYACEMAKER_BIND=$bind_host")
  options+=(--env "PYACEMAKER_STORE=$home/store" --env "PYACEMAKER_HOME=$home" --env "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}")
  local variable
  for variable in "${security_files[@]}"; do
    if [ -n "${!variable:-}" ]; then
      options+=(--bind "${!variable}:/run/pyacemaker/${variable,,}:ro" --env "$variable=/run/pyacemaker/${variable,,}")
    fi
  done
  for variable in "${security_values[@]}"; do
    if [ -n "${!variable:-}" ]; then options+=(--env "$variable=${!variable}"); fi
  done
  printf '%s\n' "${options[@]}"
}

service_arguments() {
  case $1 in
    orchestrator)
      echo --sampler "$peer_host:$(port_of sampler)" --oracle "$peer_host:$(port_of oracle)"
      echo --trainer "$peer_host:$(port_of trainer)"
      for address in ${PYACEMAKER_LABELLING_ORACLES:-}; do echo --labelling-oracle "$address"; done ;;
    oracle) echo --work-dir "$home/oracle" --deployment "$oracle_deployment" ;;
    trainer) echo --work-dir "$home/trainer" ;;
  esac
}

wait_healthy() {
  local service=$1 deadline=$((SECONDS + health_timeout))
  [ "$apptainer" = echo ] && return 0
  # The image's grpc.health.v1 probe, run inside the instance (health needs no token).
  until "$apptainer" exec --env "PYACEMAKER_PORT=$(port_of "$service")" "instance://$(instance_of "$service")" \
      python /opt/pyacemaker/bin/healthcheck.py; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: $service did not report SERVING within ${health_timeout} s (log: apptainer instance list --logs)" >&2
      return 1
    fi
    sleep 1
  done
}

# The default oracle deployment: array tasks through the Apptainer Slurm template, the image's pw.x and pseudos.
write_default_deployment() {
  cp "$script_dir/slurm_task.sh" "$home/slurm_task.sh"
  {
    echo "# Written by containers/apptainer/start_services.sh; edit it (docs/deployment.md), then restart the oracle."
    echo "executors:"
    echo "  slurm:"
    echo "    template: $home/slurm_task.sh"
  } > "$oracle_deployment"
}

start() {
  mkdir -p "$home/store" "$home/oracle" "$home/trainer"
  if [ ! -e "$oracle_deployment" ]; then write_default_deployment; fi
  local service options arguments image
  for service in $services; do
    image=$(image_of "$service")
    if [ "$apptainer" != echo ] && [ ! -f "$image" ]; then
      echo "error: $image is missing; build it from containers/apptainer/*.def" >&2
      return 1
    fi
    mapfile -t options < <(common_options "$service")
    if [ "$service" = oracle ]; then
      options+=(--bind "$slurm_binds" --env "PYACEMAKER_ORACLE_SIF=$(realpath -m "$image")")
      options+=(--bind "$oracle_deployment:$oracle_deployment:ro")
    fi
    read -r -a arguments <<< "$(service_arguments "$service" | tr '\n' ' ')"
    "$apptainer" instance start "${options[@]}" "$image" "$(instance_of "$service")" "${arguments[@]}"
    wait_healthy "$service"
  done
  {
    for service in $services; do
      echo "export PYACEMAKER_${service^^}_ADDRESS=$peer_host:$(port_of "$service")"
    done
  } > "$home/apptainer.env"
  echo "services started; run: source $home/apptainer.env"
}

stop() {
  local service
  for service in $services; do
    "$apptainer" instance stop "$(instance_of "$service")" || true
  done
  rm -f "$home/apptainer.env"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) "$apptainer" instance list ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
