#!/bin/sh
# The example stack's job: runs once before the worker (which depends on it having
# completed), and exits 0. Under `restart: never` nexus records it as completed.
echo "migrating the example database..."
sleep 1
echo "migration done"
