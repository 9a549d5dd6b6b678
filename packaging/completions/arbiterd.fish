# The names of the running masters: their control sockets.
function __arbiter_names
    for d in $XDG_RUNTIME_DIR/arbiter /run/arbiter /tmp/arbiter-(id -u)
        for f in $d/*.sock
            test -S $f; and string replace -r '\.sock$' '' -- (basename $f)
        end
    end
end

complete -c arbiterd -s b -l bind -d 'Address to listen on: HOST:PORT, [V6]:PORT, unix:PATH or fd://N (repeatable)' -r
complete -c arbiterd -s w -l workers -d 'Number of workers: N, or MIN..MAX to adapt the count to the load (one more while connections wait in the accept queue or every worker is busy, one fewer after a long idle spell)' -r
complete -c arbiterd -l max-workers -d 'The most workers `scale`, TTIN and the config may ask for' -r
complete -c arbiterd -s t -l timeout -d 'Heartbeat timeout in seconds; 0 disables' -r
complete -c arbiterd -l graceful-timeout -d 'How long TERMed workers may drain before KILL, in seconds' -r
complete -c arbiterd -l shutdown-delay -d 'On TERM, keep serving this many seconds first, with /readyz saying 503, so that balancers stop sending before anything closes; then stop gracefully' -r
complete -c arbiterd -l ready-min -d '/readyz says 200 once this many workers are ready (default: the target count; never more than the target)' -r
complete -c arbiterd -l ready -d 'When a worker counts as ready: `exec` (exec succeeded) or `notify` (READY=1). Default: exec for a COMMAND, notify for the built-in worker (it sends READY=1)' -r -f -a "exec\t''
notify\t''"
complete -c arbiterd -l boot-timeout -d 'A worker not ready by then is killed and counts as a boot failure, in seconds' -r
complete -c arbiterd -l kill-mode -d 'Who gets a worker\'s graceful signals: `mixed` (its main process; the rest of its tree TERM then KILL once it exited), `group` (its whole tree at once), `process` (its main process only; the rest is left alone)' -r -f -a "mixed\t'Graceful signals to the main process; once it exited (or at the graceful deadline), TERM then KILL to whatever is left of its tree'
group\t'Every signal to the whole tree at once'
process\t'Signals to the main process only; the rest of the tree is left running'"
complete -c arbiterd -l cgroup -d '`auto`: each worker in a cgroup v2 of its own where the hierarchy is writable (its whole tree is then known and killed at once); `off`: process groups only' -r -f -a "auto\t''
off\t''"
complete -c arbiterd -s n -l name -d 'Instance name: process titles, default paths, logs' -r -f -a "(__arbiter_names)"
complete -c arbiterd -s p -l pid -d 'Pidfile' -r -F
complete -c arbiterd -l control -d 'Control socket path' -r -F
complete -c arbiterd -l metrics-bind -d 'Serve Prometheus metrics at GET /metrics on this address: HOST:PORT, [V6]:PORT or unix:PATH (port 0: any free port, logged as `Metrics at:`)' -r
complete -c arbiterd -l log-file -d 'Log file; `-` is stderr' -r -F
complete -c arbiterd -l log-level -d 'debug, info, warning, error or critical' -r -f -a "debug\t''
info\t''
warning\t''
error\t''
critical\t''"
complete -c arbiterd -s c -l config -d 'TOML file with the same keys as the long options; re-read on reload' -r -F
complete -c arbiterd -l max-worker-rss -d 'Recycle a worker whose RSS exceeds this many MiB' -r
complete -c arbiterd -l max-worker-age -d 'Recycle a worker older than this many seconds' -r
complete -c arbiterd -l max-requests -d 'Recycle a worker after it served this many requests (0: never); only workers that count requests on the scoreboard' -r
complete -c arbiterd -l max-requests-jitter -d 'Add 0..=J to each worker\'s --max-requests, drawn per worker' -r
complete -c arbiterd -l env -d 'Set KEY=VALUE in the workers\' environment (repeatable; re-read on reload)' -r
complete -c arbiterd -l env-file -d 'Read the workers\' environment from this file (systemd EnvironmentFile syntax), at start and at every reload; --env wins over it' -r -F
complete -c arbiterd -l backlog -d 'Listen backlog' -r
complete -c arbiterd -l umask -d 'File mode creation mask, octal' -r
complete -c arbiterd -l chdir -d 'Change to this directory before anything else' -r -F
complete -c arbiterd -l user -d 'Run workers as this user (name or uid)' -r
complete -c arbiterd -l group -d 'Run workers as this group (name or gid)' -r
complete -c arbiterd -l reload-on-change -d 'For development: reload (as HUP does) once a burst of changes under PATH ends. No PATH: the working directory. Trees are watched whole, but for .git, __pycache__, node_modules and editors\' temp files' -r -F
complete -c arbiterd -s D -l daemon -d 'Detach (double fork, setsid, stdio to /dev/null) once a worker serves, or fail with the reason within --boot-timeout; the working directory stays'
complete -c arbiterd -l reuse-port -d 'Set SO_REUSEPORT on the listeners'
complete -c arbiterd -l check-config -d 'Check the configuration (flags, config file, COMMAND) and exit: 0 if it is valid. Binds nothing; used before an upgrade to vet the new binary'
complete -c arbiterd -l preload -d 'Start COMMAND once per generation as a template that loads the application and forks the workers (docs/workers.md, "Preloading"); HUP starts a new template, so new code is loaded'
complete -c arbiterd -s h -l help -d 'Print help (see more with \'--help\')'
complete -c arbiterd -s V -l version -d 'Print version'
