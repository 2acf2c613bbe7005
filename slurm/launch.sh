# dlm-pretrain's job runtime, sourced by every batch script (slurm/*.sbatch and the ones
# `dlm slurm submit` renders). One process per task under srun, the rendezvous from the
# allocation, Slurm's warning signal forwarded to the ranks, and the requeue decision:
#
#   dlm_launch COMMAND [ARGS...]     e.g. dlm_launch "$DLM_PYTHON" -m pretrain.train run.dir=...
#
# COMMAND's exit code decides what happens to the job:
#   0   done;
#   75  stopped with a checkpoint before the end (time-limit warning, preemption): requeue;
#   2   invalid configuration: fail (it would fail again);
#   any other (a rank crashed or was killed): requeue while DLM_MAX_FAILURES allows,
#       resuming from the last complete checkpoint; then fail.
# Once one task has exited, srun gives the others DLM_EXIT_WAIT seconds (default 60) and
# then kills them: ranks that stop together all exit 75 within that, while the peers of a
# rank that died (blocked in a collective) do not hang until the collective's timeout.
# (Not --kill-on-bad-exit: it would kill the peers of the first rank to exit 75.)
# No job requeues more than DLM_MAX_REQUEUES times (SLURM_RESTART_COUNT).
# With DLM_STAGE set (the jobs of `dlm slurm pipeline`), the outcome is also recorded in
# $DLM_STATE_DIR/status-<stage>[-<array task>].json for `dlm slurm status`, which needs it
# once slurmctld has forgotten the job and no accounting (sacct) keeps it.

dlm_rendezvous() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # concurrent jobs do not collide
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

dlm_launch() {
    dlm_rendezvous
    echo "dlm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
        "$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"
    DLM_SIGNALED=
    srun --kill-on-bad-exit=0 --wait="${DLM_EXIT_WAIT:-60}" "$@" &
    local step=$!
    # Slurm signals the batch shell (--signal=B:USR1@S, scancel --signal=USR1 --batch);
    # srun forwards the signal to every task, which stop at the same step (pretrain/stop.py)
    trap 'DLM_SIGNALED=1; echo "dlm: SIGUSR1: the ranks stop after the current step"; kill -USR1 $step' USR1
    trap 'DLM_SIGNALED=1; echo "dlm: SIGTERM: the ranks stop after the current step"; kill -TERM $step' TERM
    local rc
    while :; do
        wait "$step"
        rc=$?
        if [ "$rc" -gt 128 ] && [ -n "$DLM_SIGNALED" ]; then  # wait was cut short by the trap
            DLM_SIGNALED=
            continue
        fi
        break
    done
    trap - USR1 TERM
    dlm_after "$rc"
}

dlm_after() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$rc" -eq 0 ]; then
        echo "dlm: done"
        dlm_record done 0
        return 0
    fi
    if [ "$rc" -eq 2 ]; then
        echo "dlm: invalid configuration (exit 2): not requeued"
        dlm_record failed 2
        return 2
    fi
    if [ "$restarts" -ge "${DLM_MAX_REQUEUES:-50}" ]; then
        echo "dlm: exit $rc after $restarts requeues (DLM_MAX_REQUEUES=${DLM_MAX_REQUEUES:-50}): giving up"
        dlm_record failed "$rc"
        return "$rc"
    fi
    if [ "$rc" -ne 75 ]; then
        local failures=0 record="${DLM_STATE_DIR:-.}/failures-$SLURM_JOB_ID"
        [ -f "$record" ] && failures=$(cat "$record")
        if [ "$failures" -ge "${DLM_MAX_FAILURES:-1}" ]; then
            echo "dlm: failed (exit $rc), $failures earlier failures: giving up"
            dlm_record failed "$rc"
            return "$rc"
        fi
        echo $((failures + 1)) > "$record"
        echo "dlm: failed (exit $rc): requeueing, to resume from the last complete checkpoint"
    else
        echo "dlm: stopped with a checkpoint (exit 75): requeueing"
    fi
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        dlm_record failed "$rc"
        return "$rc"
    fi
    dlm_record requeued "$rc"
    return 0
}

dlm_record() {  # OUTCOME EXIT: the job's outcome for `dlm slurm status` (pipeline stages)
    [ -n "${DLM_STAGE:-}" ] || return 0
    local file="${DLM_STATE_DIR:-.}/status-$DLM_STAGE${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}.json"
    printf '{"job": "%s", "array_job": "%s", "outcome": "%s", "exit": %d, "restarts": %d, "time": %d}\n' \
        "$SLURM_JOB_ID" "${SLURM_ARRAY_JOB_ID:-}" "$1" "$2" "${SLURM_RESTART_COUNT:-0}" "$(date +%s)" > "$file.tmp" &&
        mv -f "$file.tmp" "$file"
}
