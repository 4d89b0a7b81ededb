# Fails on its first attempt, succeeds on the next: shows retries with backoff.
if [ "$NEXUS_TASK_ATTEMPT" = 1 ]; then
  echo "attempt 1: the network is down (pretend)" >&2
  exit 75
fi
echo "attempt $NEXUS_TASK_ATTEMPT: fine"
