#!/bin/sh
# pyqmail's container entrypoint: make the home on the volume at first start, then run the MTA.
#
#   (no argument) or run [ARGS]  pyqmail run --home $PYQMAIL_HOME --smtp $PYQMAIL_SMTP [ARGS]
#   anything else                 pyqmail ANYTHING ELSE (check, showctl, qread, adopt ...)
#
# PYQMAIL_HOME (/var/qmail, the volume), PYQMAIL_ME (the home's control/me at first start;
# default: the container's host name), PYQMAIL_SMTP (0.0.0.0:25), PYQMAIL_SINGLE_USER=1 to
# run everything as the container's user instead of qmail's accounts.
set -eu
home=${PYQMAIL_HOME:-/var/qmail}
smtp=${PYQMAIL_SMTP:-0.0.0.0:25}
if [ "$#" -gt 0 ] && [ "$1" != run ]; then
  exec pyqmail "$@"
fi
[ "$#" -gt 0 ] && shift
if [ ! -d "$home/control" ]; then
  me=${PYQMAIL_ME:-$(hostname -f 2>/dev/null || hostname)}
  if [ "${PYQMAIL_SINGLE_USER:-}" = 1 ]; then mode=--single-user; else mode=--create-users; fi
  pyqmail init "$home" --me "$me" "$mode" -q
  echo "pyqmail-entrypoint: made the home $home for $me" >&2
fi
exec pyqmail run --home "$home" --smtp "$smtp" "$@"
