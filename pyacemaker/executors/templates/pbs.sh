#!/bin/bash
# PyAceMaker job: one PBS Pro array subjob per calculation of the oracle, or a training worker of the trainer (one task).
#
# To adapt it (modules, a container, scratch on local disk), copy this file, edit the copy and set
# `executors.pbs.template` in the oracle's deployment file (or `executors.<profile>.template` in the trainer's)
# to its path (docs/deployment.md). Placeholders in double braces are filled in at submission:
#   job_name  array_directive  job_dir  task_list  walltime  select  directives  task_command  ncpus
#   threads_per_rank
# A line holding only a placeholder that comes out empty is dropped.
#PBS -N {{ job_name }}
{{ array_directive }}
#PBS -l walltime={{ walltime }}
#PBS -l select={{ select }}
#PBS -j oe
#PBS -o {{ job_dir }}/
{{ directives }}

export OMP_NUM_THREADS={{ threads_per_rank }}
task_dir=$(sed -n "$((${PBS_ARRAY_INDEX:-0} + 1))p" {{ task_list }})
cd "$task_dir" || exit 1
{{ task_command }} "$task_dir"
status=$?
echo "$status" > "$task_dir/exit_code"
exit "$status"
