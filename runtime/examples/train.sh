# A pretend training job: reads its task (JSON) from stdin, works a little, prints a result.
task=$(cat)
echo "training on $(hostname) for task $NEXUS_TASK_ID (attempt $NEXUS_TASK_ATTEMPT): $task" >&2
sleep 1
echo '{"accuracy": 0.93}'
