# gunicorn settings for running gunicorn as ONE arbiterd worker.
#
# No `bind`: arbiterd passes the listener as fd 3 with LISTEN_FDS and
# LISTEN_PID=<this gunicorn's pid>, which gunicorn adopts as it would from systemd.
# (`-b fd://3` on top of that makes gunicorn take fd 3 twice and die with EBADF.)

# arbiterd owns the process count (-w, TTIN/TTOU, `arbiterctl scale`): one
# gunicorn worker per arbiterd worker.
workers = 1

# Load the app in the gunicorn master before it sends READY=1 to NOTIFY_SOCKET,
# so `arbiterd --ready notify` counts this worker ready only once the app loaded.
preload_app = True

# Shorter than arbiterd's --graceful-timeout (30 s by default), so gunicorn's own
# drain ends before arbiterd's KILL.
graceful_timeout = 25

# gunicorn >= 25 opens a control socket at ~/.gunicorn/gunicorn.ctl; every
# arbiterd worker would fight over that one path. Use `arbiterctl` instead.
# (Older gunicorn ignores this unknown setting.)
control_socket_disable = True

# Access logs would go through arbiterd's log, one line per request.
accesslog = None
