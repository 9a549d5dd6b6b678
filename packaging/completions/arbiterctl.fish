# The names of the running masters: their control sockets.
function __arbiter_names
    for d in $XDG_RUNTIME_DIR/arbiter /run/arbiter /tmp/arbiter-(id -u)
        for f in $d/*.sock
            test -S $f; and string replace -r '\.sock$' '' -- (basename $f)
        end
    end
end

# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_arbiterctl_global_optspecs
    string join \n n/name= control= pid= trust-uid= json timeout= h/help V/version
end

function __fish_arbiterctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_arbiterctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_arbiterctl_using_subcommand
    set -l cmd (__fish_arbiterctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -s V -l version -d 'Print version'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "status" -d 'The master line, its listeners, then one line per worker: state, age, last beat against the timeout, restarts, CPU%, RSS, its STATUS= text (exit 4 if fewer workers are ready than the target)'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "scale" -d 'Change the number of workers: +N more, -N fewer, N or =N exactly (never below 1; the master refuses more than its --max-workers)'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "reload" -d 'Reload (as HUP): start a new generation, retire the old one once the new one is ready; waits until done and prints the outcome'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "upgrade" -d 'Replace the master by a new binary without dropping a connection; waits until the new master serves (rolls back if it fails)'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "reopen" -d 'Reopen the log file (as USR1)'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "stop" -d 'Stop the master (as TERM: workers finish their requests); waits until it exited'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "kill" -d 'Signal one worker (default TERM); the master replaces it'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "metrics" -d 'Prometheus text exposition of the status, every series labelled arbiter="NAME": worker states, RSS, CPU seconds, heartbeat ages, restarts, reload and upgrade counts'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "top" -d 'A live view refreshed every second: the listeners with their accept queues, then one line per worker (state, busy, requests, CPU%, RSS, beat age); q quits. Plain frames when not on a terminal'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "ping" -d 'Is the master answering?'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "version" -d 'Versions of arbiterctl and of the master, with their protocol versions'
complete -c arbiterctl -n "__fish_arbiterctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand scale" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reload" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l binary -d 'The new binary [default: the one the master was started from]' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand upgrade" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand reopen" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l fast -d 'Stop at once (as QUIT)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand stop" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -s s -l signal -d 'TERM, SIGTERM, term or 15' -r -f -a "HUP\t''
INT\t''
QUIT\t''
ILL\t''
TRAP\t''
ABRT\t''
BUS\t''
FPE\t''
KILL\t''
USR1\t''
SEGV\t''
USR2\t''
PIPE\t''
ALRM\t''
TERM\t''
STKFLT\t''
CHLD\t''
CONT\t''
STOP\t''
TSTP\t''
TTIN\t''
TTOU\t''
URG\t''
XCPU\t''
XFSZ\t''
VTALRM\t''
PROF\t''
WINCH\t''
IO\t''
PWR\t''
SYS\t''"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand kill" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand metrics" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l interval -d 'Seconds between frames' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l once -d 'Print one frame and exit (for scripts)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand top" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand ping" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -s n -l name -d 'Instance name: talk to the master at its default control socket, trying $XDG_RUNTIME_DIR/arbiter/NAME.sock, then /run/arbiter/NAME.sock for root or /tmp/arbiter-UID/NAME.sock (where a master started without XDG_RUNTIME_DIR, as by systemd, listens) [default: arbiter]' -r -f -a "(__arbiter_names)"
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -l control -d 'The control socket path' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -l pid -d 'The master\'s pidfile: find its control socket from its command line (--control, --name, or the config file it was started with)' -r -F
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -l trust-uid -d 'Also talk to a master running as this uid (default: only one running as you or as root); may be repeated' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -l timeout -d 'Give up after SECS (0: wait as long as it takes). Default 10; reload and stop wait until done: 120. For upgrade: how long the new master may take to be ready (default 60)' -r
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -l json -d 'Print one JSON document on stdout (errors too: {"error":{"kind","message"}})'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand version" -s h -l help -d 'Print help'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "status" -d 'The master line, its listeners, then one line per worker: state, age, last beat against the timeout, restarts, CPU%, RSS, its STATUS= text (exit 4 if fewer workers are ready than the target)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "scale" -d 'Change the number of workers: +N more, -N fewer, N or =N exactly (never below 1; the master refuses more than its --max-workers)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "reload" -d 'Reload (as HUP): start a new generation, retire the old one once the new one is ready; waits until done and prints the outcome'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "upgrade" -d 'Replace the master by a new binary without dropping a connection; waits until the new master serves (rolls back if it fails)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "reopen" -d 'Reopen the log file (as USR1)'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "stop" -d 'Stop the master (as TERM: workers finish their requests); waits until it exited'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "kill" -d 'Signal one worker (default TERM); the master replaces it'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "metrics" -d 'Prometheus text exposition of the status, every series labelled arbiter="NAME": worker states, RSS, CPU seconds, heartbeat ages, restarts, reload and upgrade counts'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "top" -d 'A live view refreshed every second: the listeners with their accept queues, then one line per worker (state, busy, requests, CPU%, RSS, beat age); q quits. Plain frames when not on a terminal'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "ping" -d 'Is the master answering?'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "version" -d 'Versions of arbiterctl and of the master, with their protocol versions'
complete -c arbiterctl -n "__fish_arbiterctl_using_subcommand help; and not __fish_seen_subcommand_from status scale reload upgrade reopen stop kill metrics top ping version help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
