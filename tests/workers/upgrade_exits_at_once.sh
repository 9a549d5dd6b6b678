#!/bin/sh
# Stands in for a broken new arbiterd binary: it accepts the configuration
# (`--check-config` exits 0) but, started for real, exits 1 at once.
if [ "$1" = "--check-config" ]; then
    exit 0
fi
exit 1
