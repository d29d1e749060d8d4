#!/bin/bash
# PyAceMaker job: one Slurm array task per calculation of the oracle, or a training worker of the trainer (one task).
#
# To adapt it (modules, a container, scratch on local disk), copy this file, edit the copy and set
# `executors.slurm.template` in the oracle's deployment file (or `executors.<profile>.template` in the trainer's)
# to its path (docs/deployment.md). Placeholders in double braces are filled in at submission:
#   job_name  array  job_dir  task_list  time_limit  ntasks  cpus_per_task  directives  task_command
# A line holding only a placeholder that comes out empty is dropped.
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
{{ task_command }} "$task_dir"
status=$?
echo "$status" > "$task_dir/exit_code"
exit "$status"
