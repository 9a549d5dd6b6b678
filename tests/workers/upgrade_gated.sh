#!/bin/sh
# Stands in for a new arbiterd binary whose configuration check takes as long as the
# test wants: `--check-config` waits until the file $UPGRADE_GATE exists. Then the
# check and the real start are those of the real binary, $UPGRADE_REAL.
if [ "$1" = "--check-config" ]; then
    while [ ! -e "$UPGRADE_GATE" ]; do
        sleep 0.02
    done
fi
exec "$UPGRADE_REAL" "$@"
