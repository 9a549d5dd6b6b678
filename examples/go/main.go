// Command go-worker is an arbiterd worker in Go, standard library only.
//
// It takes the listener arbiterd passes as fd 3 (LISTEN_FDS/LISTEN_PID, as
// systemd socket activation does), and speaks sd_notify to the master over the
// unix datagram socket NOTIFY_SOCKET, by hand:
//
//	READY=1      once it serves (run arbiterd with --ready notify)
//	WATCHDOG=1   every WATCHDOG_USEC/2: the heartbeat
//	STATUS=...   shown by `arbiterctl status`
//	STOPPING=1   when TERM starts the drain
//
// GET / answers {"app":"go","pid":..,"worker_id":..,"generation":..}, GET
// /sleep?ms=N the same after N ms. TERM: http.Server.Shutdown (stop accepting,
// finish the requests in flight, at most 30 s), exit 0. QUIT and INT: exit at
// once. Without LISTEN_FDS for this process it exits 78 (EX_CONFIG), which
// arbiterd does not restart.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// exConfig is sysexits' EX_CONFIG: arbiterd does not restart a worker that exits with it.
const exConfig = 78

// listenFdsStart is SD_LISTEN_FDS_START: the first --bind is fd 3.
const listenFdsStart = 3

// drainLimit bounds the wait for requests in flight after TERM (arbiterd's
// --graceful-timeout, 30 s by default, would KILL us about then anyway).
const drainLimit = 30 * time.Second

// listener takes fd 3 if LISTEN_PID and LISTEN_FDS say it is meant for this
// process, as sd_listen_fds does, and unsets them so that a child does not take
// it too.
func listener() (net.Listener, error) {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return nil, errors.New("LISTEN_PID is not this process")
	}
	if n, err := strconv.Atoi(os.Getenv("LISTEN_FDS")); err != nil || n < 1 {
		return nil, errors.New("no LISTEN_FDS")
	}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(k)
	}
	f := os.NewFile(listenFdsStart, "LISTEN_FD_3")
	// FileListener works on a dup (close-on-exec, non-blocking for Go's poller),
	// so fd 3 itself is closed after. The non-blocking flag is the socket's,
	// shared with the siblings; a connection one of them won first is an EAGAIN
	// the runtime waits out.
	defer f.Close()
	return net.FileListener(f)
}

// notify sends one sd_notify datagram to NOTIFY_SOCKET; best effort, as
// systemd's sd_notify. A leading '@' (abstract namespace) is understood by Go's
// net package itself. The master knows which worker sent it from the kernel's
// credentials of the sender, so nothing names the worker in the message.
func notify(state string) bool {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return false
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return false
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err == nil
}

// watchdogPeriod is half of WATCHDOG_USEC, as systemd's documentation asks, or
// 0 when no watchdog is wanted from this process.
func watchdogPeriod() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}

func envInt(k string) int {
	n, _ := strconv.Atoi(os.Getenv(k))
	return n
}

func main() {
	ln, err := listener()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-worker: fd %d: %v; run it under arbiterd\n", listenFdsStart, err)
		os.Exit(exConfig)
	}

	body, _ := json.Marshal(map[string]interface{}{
		"app":        "go",
		"pid":        os.Getpid(),
		"worker_id":  envInt("ARBITER_WORKER_ID"),
		"slot":       envInt("ARBITER_SLOT"),
		"generation": envInt("ARBITER_GENERATION"),
	})
	var served atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/sleep" {
			ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
			if err != nil {
				ms = 1000
			}
			time.Sleep(time.Duration(ms) * time.Millisecond)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
		served.Add(1)
	})
	srv := &http.Server{
		Handler: mux,
		// A client that connects and sends nothing would hold Shutdown for
		// ever: Go counts a new connection as idle only after 5 s.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       10 * time.Second,
	}

	// Signals first, so a TERM that comes right after READY=1 is not lost.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	drained := make(chan struct{})
	go func() {
		for sig := range signals {
			if sig != syscall.SIGTERM {
				os.Exit(0)
			}
			notify("STOPPING=1")
			// Shutdown closes the listener (the siblings keep the socket), closes
			// idle connections, and waits for the others to finish their request.
			// A connection accepted but not read yet counts as busy, so a request
			// that reached us in the instant before TERM is served, not reset.
			ctx, cancel := context.WithTimeout(context.Background(), drainLimit)
			srv.Shutdown(ctx)
			cancel()
			close(drained)
			return
		}
	}()

	// The heartbeat, from its own goroutine: it proves the process and its
	// runtime are alive (a handler stuck for ever does not stop it; a wedged
	// process does).
	if period := watchdogPeriod(); period > 0 {
		go func() {
			for range time.Tick(period) {
				notify(fmt.Sprintf("WATCHDOG=1\nSTATUS=served %d requests", served.Load()))
			}
		}()
	}

	notify(fmt.Sprintf("READY=1\nSTATUS=serving on %s", ln.Addr()))
	// Serve returns ErrServerClosed as soon as Shutdown starts; the drain is
	// over only when Shutdown returns.
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "go-worker: %v\n", err)
		os.Exit(1)
	}
	<-drained
}
