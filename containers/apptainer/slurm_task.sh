#!/bin/bash
# PyAceMaker oracle job for an oracle running as an Apptainer instance (containers/apptainer/start_services.sh):
# one Slurm array task per calculation, run inside the oracle's own image, so the compute nodes need only
# Apptainer and the shared PYACEMAKER_HOME. Use it with, in the oracle's deployment file (start_services.sh writes
# one that does, with a copy of this file in $PYACEMAKER_HOME):
#   executors: {slurm: {template: /path/to/slurm_task.sh}}
# The job inherits PYACEMAKER_ORACLE_SIF and PYACEMAKER_HOME from the instance that submits it (sbatch exports
# the submitter's environment). Placeholders in double braces are filled in at submission, as in the bundled
# template (pyacemaker/executors/templates/slurm.sh); the task_command placeholder is not used here: the
# task runs with the image's Python through apptainer exec, not with the instance's path to it.
#SBATCH --job-name={{ job_name }}
#SBATCH --array={{ array }}
#SBATCH --output={{ job_dir }}/slurm-%A_%a.out
#SBATCH --time={{ time_limit }}
#SBATCH --cpus-per-task={{ cpus_per_task }}
#SBATCH --ntasks={{ ntasks }}
{{ directives }}

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
task_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {{ task_list }})
cd "$task_dir" || exit 1
apptainer exec --cleanenv --bind "${PYACEMAKER_HOME:?}" --env "OMP_NUM_THREADS=$OMP_NUM_THREADS" \
  "${PYACEMAKER_ORACLE_SIF:?}" python -m pyacemaker.services.oracle.task "$task_dir"
status=$?
echo "$status" > "$task_dir/exit_code"
exit "$status"
