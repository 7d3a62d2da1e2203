#!/bin/sh
# The container's entry point: the BIDS App (synthtools-bids), which also runs
# any command of the image, so both conventions work:
#
#   docker run IMAGE /data/ds /data/out participant ...  ->  synthtools-bids /data/ds /data/out participant ...
#   docker run IMAGE synthstrip in.nii.gz out.nii.gz    ->  synthstrip in.nii.gz out.nii.gz
#   docker run IMAGE                                     ->  synthtools-bids --help
#
# The first argument runs as a command when it is one on PATH (a tool, sh,
# python); a path or an option (e.g. -h) goes to the BIDS App.
if [ "$#" -eq 0 ]; then
    exec synthtools-bids --help
fi
case "$1" in
    */* | -*) exec synthtools-bids "$@" ;;
esac
if command -v "$1" > /dev/null 2>&1; then
    exec "$@"
fi
exec synthtools-bids "$@"
