// Package run is the client side of `hangar run`: lease an instance with a
// command (or start the command on a lease the caller holds), stream the
// command's output, renew the lease meanwhile, release it, and turn what
// happened into an exit status a CI can act on. It speaks to Hangar only
// through the lease API's Go client (pool/api); cmd/hangar's `run` command
// parses the command line and calls Run.
package run

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Exit statuses of Run that are its own, not the command's. They follow
// sysexits (EX_TEMPFAIL) and `docker run` (125), so that a CI can tell
// "retry later" and "Hangar broke" from a failed build. A command killed by
// signal N gives 128+N, as does Run interrupted by signal N.
const (
	ExitNoInstance = 75  // no instance could be had within Options.Wait
	ExitHangar     = 125 // Hangar failed; the command may not have run or finished
)

// DefaultWait is how long `hangar run` waits for an instance by default.
const DefaultWait = 10 * time.Minute

// Options say what to run where.
type Options struct {
	// Exactly one of Pool and Lease: lease an instance of Pool (released
	// when the command exits), or run on Lease, a lease the caller holds
	// (which stays theirs).
	Pool  string
	Lease string
	// Command is the program and its arguments; each reaches the instance
	// as it is, quoted by Hangar, never through a shell of this machine.
	Command []string
	// Wait is how long to wait for an instance of Pool; 0 gives up as soon
	// as none is free.
	Wait time.Duration
	// TTL is the lease time between renewals; 0 is the pool's lease_ttl.
	TTL time.Duration
	// DiscardOnFailure terminates the instance of a command that failed
	// instead of giving it back for reuse; only with Pool.
	DiscardOnFailure bool
	// Quiet leaves out Run's notes on stderr except errors and the notes
	// that explain an exit status of its own.
	Quiet bool
}

// Check reports what makes o unusable.
func (o Options) Check() error {
	switch {
	case o.Pool == "" && o.Lease == "":
		return errors.New("a pool to lease from, or a lease to run on, is required")
	case o.Pool != "" && o.Lease != "":
		return errors.New("a pool to lease from, or a lease to run on, not both")
	case len(o.Command) == 0:
		return errors.New("no command")
	case o.Lease != "" && o.DiscardOnFailure:
		return errors.New("--discard-on-failure needs hangar run to lease (POOL); with --lease, release your lease yourself")
	case o.Wait < 0 || o.TTL < 0:
		return errors.New("--wait and --ttl must not be negative")
	}
	return nil
}

// Run runs o.Command on an instance through the Hangar server of client,
// copies its output (stdout and stderr merged) to stdout, writes its own
// notes to stderr ("hangar: …"), and returns the exit status: the
// command's, or ExitNoInstance, ExitHangar, or 128+N when Run was
// interrupted by signal N. While it runs, SIGINT and SIGTERM end the lease
// (discarding its instance, which ends the command) and SIGPIPE is
// ignored, so that a reader of stdout that goes away does not keep the
// lease; a write error ends the run the same way. A ctx that ends early
// ends the lease too, with ExitHangar.
func Run(ctx context.Context, client *api.Client, o Options, stdout, stderr io.Writer) (exitCode int) {
	r := &runner{c: client, o: o, stdout: stdout, stderr: stderr}
	if err := o.Check(); err != nil {
		return r.fail(ExitHangar, "%v", err)
	}
	return r.run(ctx)
}

type runner struct {
	c              *api.Client
	o              Options
	stdout, stderr io.Writer
	caught         atomic.Int32 // the signal that interrupted the run
}

func (r *runner) say(format string, a ...any) {
	if !r.o.Quiet {
		_, _ = fmt.Fprintf(r.stderr, "hangar: "+format+"\n", a...)
	}
}

func (r *runner) fail(code int, format string, a ...any) int {
	_, _ = fmt.Fprintf(r.stderr, "hangar: "+format+"\n", a...)
	return code
}

// run does the work and returns the exit status.
func (r *runner) run(parent context.Context) int {
	ctx, cancel := context.WithCancel(orBackground(parent))
	defer cancel()
	sigs := make(chan os.Signal, 1)
	// SIGPIPE too: a reader of our stdout that goes away must not kill
	// this process before it releases the lease.
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGPIPE)
	defer signal.Stop(sigs)
	go func() {
		for {
			select {
			case s := <-sigs:
				if s == syscall.SIGPIPE {
					continue // the failed write says so
				}
				r.caught.Store(int32(s.(syscall.Signal)))
				cancel()
				return
			case <-ctx.Done():
				return
			}
		}
	}()

	var v pool.LeaseView
	var code int
	var over bool
	if r.o.Lease != "" {
		v, code, over = r.startRun(ctx)
	} else {
		v, code, over = r.leaseAndWait(ctx)
	}
	if over {
		return code
	}
	if code, over = r.stream(ctx, v); over {
		return code // the lease is over already, or was released
	}
	if r.o.Lease == "" {
		discard := r.o.DiscardOnFailure && code != 0
		if err := r.release(ctx, v.ID, discard); err != nil {
			_, _ = fmt.Fprintf(r.stderr, "hangar: the command exited with status %d; releasing lease %s failed: %v (it ends when its TTL runs out)\n", code, v.ID, err)
		} else if discard {
			r.say("the command exited with status %d; lease %s released, its instance discarded", code, v.ID)
		} else {
			r.say("the command exited with status %d; lease %s released", code, v.ID)
		}
	}
	return code
}

// interrupted reports whether a signal ended ctx, and which.
func (r *runner) interrupted() (syscall.Signal, bool) {
	s := syscall.Signal(r.caught.Load())
	return s, s != 0
}

// SignalNames names the signals Run tells of.
var SignalNames = map[syscall.Signal]string{syscall.SIGINT: "SIGINT", syscall.SIGTERM: "SIGTERM", syscall.SIGPIPE: "SIGPIPE"}

// cutShort ends the lease (if any) of a run that cannot go on and returns
// code. The instance is discarded: what the command left behind is unknown.
// The note is shown even when quiet, since it explains the exit status.
func (r *runner) cutShort(ctx context.Context, leaseID string, code int, why string) int {
	switch {
	case leaseID == "":
		return r.fail(code, "%s before a lease was made", why)
	case r.o.Lease != "":
		// Not ours to keep, but a command cannot be stopped on its own.
		if err := r.release(ctx, leaseID, true); err != nil {
			return r.fail(code, "%s; ending lease %s failed: %v (it ends when its TTL runs out)", why, leaseID, err)
		}
		return r.fail(code, "%s; lease %s ended (it was given with --lease), its instance discarded", why, leaseID)
	}
	if err := r.release(ctx, leaseID, true); err != nil {
		return r.fail(code, "%s; releasing lease %s failed: %v (it ends when its TTL runs out)", why, leaseID, err)
	}
	return r.fail(code, "%s; lease %s released, its instance discarded", why, leaseID)
}

// cancelPending ends a lease that had no instance yet and returns code.
// It discards all the same: had an instance come meanwhile, the command
// would have started on it.
func (r *runner) cancelPending(ctx context.Context, leaseID string, code int, why string) int {
	if err := r.release(ctx, leaseID, true); err != nil {
		return r.fail(code, "%s while waiting for an instance of pool %s; canceling lease %s failed: %v (it ends when it is no longer waited for)", why, r.o.Pool, leaseID, err)
	}
	return r.fail(code, "%s while waiting for an instance of pool %s; lease %s canceled", why, r.o.Pool, leaseID)
}

// interruptedBy returns the exit status and note for a signal.
func interruptedBy(sig syscall.Signal) (int, string) {
	return 128 + int(sig), "interrupted by " + SignalNames[sig]
}

// release ends a lease, not waiting long for a server that does not answer.
// It runs when ctx may be cancelled already (by a signal), so it keeps only
// ctx's values.
func (r *runner) release(ctx context.Context, id string, discard bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	return r.c.Release(ctx, id, discard)
}

// leaseAndWait asks for a lease with the command and waits for it to be
// active; when it cannot be had, it returns the exit status and over.
func (r *runner) leaseAndWait(ctx context.Context) (v pool.LeaseView, code int, over bool) {
	req := api.LeaseRequest{Pool: r.o.Pool, Wait: "0s", Command: r.o.Command, ClientToken: "run-" + randomHex(12)}
	if r.o.TTL > 0 {
		req.TTL = r.o.TTL.String()
	}
	v, err := r.c.Lease(ctx, req)
	if err != nil {
		if sig, ok := r.interrupted(); ok {
			// The server may have made the lease before we stopped
			// listening: the same client token finds it.
			bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			code, why := interruptedBy(sig)
			if v, err := r.c.Lease(bg, req); err == nil {
				if v.State == pool.LeasePending {
					return v, r.cancelPending(ctx, v.ID, code, why), true
				}
				return v, r.cutShort(ctx, v.ID, code, why), true
			}
			return v, r.cutShort(ctx, "", code, why), true
		}
		return v, r.fail(ExitHangar, "asking for an instance of pool %s: %v", r.o.Pool, err), true
	}
	deadline := time.Now().Add(r.o.Wait)
	announced := false
	for v.State == pool.LeasePending {
		left := time.Until(deadline)
		if left <= 0 {
			if err := r.release(ctx, v.ID, false); err != nil {
				return v, r.fail(ExitNoInstance, "no instance of pool %s within %s; canceling lease %s failed: %v", r.o.Pool, r.o.Wait, v.ID, err), true
			}
			return v, r.fail(ExitNoInstance, "no instance of pool %s within %s; lease %s canceled", r.o.Pool, r.o.Wait, v.ID), true
		}
		if !announced {
			r.say("waiting for an instance of pool %s (lease %s)", r.o.Pool, v.ID)
			announced = true
		}
		next, err := r.c.GetLease(ctx, v.ID, min(left, time.Minute))
		if err != nil {
			if sig, ok := r.interrupted(); ok {
				code, why := interruptedBy(sig)
				return v, r.cancelPending(ctx, v.ID, code, why), true
			}
			if !Transient(err) {
				return v, r.cutShort(ctx, v.ID, ExitHangar, fmt.Sprintf("waiting for lease %s: %v", v.ID, err)), true
			}
			sleepCtx(ctx, time.Second) // a signal is seen at the next turn
			continue
		}
		v = next
	}
	if v.State != pool.LeaseActive {
		return v, r.fail(ExitNoInstance, "no instance of pool %s: lease %s is %s", r.o.Pool, v.ID, v.State), true
	}
	return v, 0, false
}

// startRun starts the command on the lease the caller holds.
func (r *runner) startRun(ctx context.Context) (v pool.LeaseView, code int, over bool) {
	v, err := r.c.StartRun(ctx, r.o.Lease, r.o.Command)
	if err != nil {
		if sig, ok := r.interrupted(); ok {
			// Whether the run started is unknown: end the lease, as for
			// any interrupted run.
			code, why := interruptedBy(sig)
			return v, r.cutShort(ctx, r.o.Lease, code, why), true
		}
		return v, r.fail(ExitHangar, "starting the command on lease %s: %v", r.o.Lease, err), true
	}
	return v, 0, false
}

// stream copies the run's output to stdout until it exits, renewing the
// lease meanwhile, and returns the command's status; or, with over, the
// exit status of a run cut short, its lease then released or over.
func (r *runner) stream(ctx context.Context, v pool.LeaseView) (code int, over bool) {
	if v.Instance != nil {
		r.say("running on %s (%s) for lease %s", v.Instance.ID, v.Instance.PrivateIP, v.ID)
	}
	renewCtx, stopRenew := context.WithCancel(ctx)
	defer stopRenew()
	go r.renew(renewCtx, v)

	run := 0
	if v.Run != nil {
		run = v.Run.ID
	}
	var offset int64
	epoch := ""
	started, warned := time.Now(), false
	var failingSince time.Time
	for {
		out, err := r.c.Output(ctx, v.ID, run, offset, epoch, 30*time.Second)
		if err != nil {
			if sig, ok := r.interrupted(); ok {
				code, why := interruptedBy(sig)
				return r.cutShort(ctx, v.ID, code, why), true
			}
			if !Transient(err) {
				return r.lost(ctx, v.ID, err), true
			}
			// The server may be restarting; the run goes on meanwhile.
			if failingSince.IsZero() {
				failingSince = time.Now()
			} else if time.Since(failingSince) > 2*time.Minute {
				return r.cutShort(ctx, v.ID, ExitHangar, fmt.Sprintf("reading the output of lease %s failed for 2m: %v", v.ID, err)), true
			}
			sleepCtx(ctx, time.Second)
			continue
		}
		failingSince = time.Time{}
		if out.Reset {
			_, _ = fmt.Fprintf(r.stderr, "hangar: the Hangar server restarted; some output may be missing\n")
		}
		if out.Skipped > 0 {
			_, _ = fmt.Fprintf(r.stderr, "hangar: %d bytes of output were dropped: this reader fell more than %d MiB behind\n", out.Skipped, pool.MaxOutput>>20)
		}
		epoch, offset = out.Epoch, out.Next
		if _, err := r.stdout.Write(out.Data); err != nil {
			return r.cutShort(ctx, v.ID, 128+int(syscall.SIGPIPE), fmt.Sprintf("writing the command's output: %v", err)), true
		}
		if out.Done {
			return out.ExitCode, false
		}
		if !warned && out.State == pool.RunStarting && time.Since(started) > 2*time.Minute {
			_, _ = fmt.Fprintf(r.stderr, "hangar: the instance has not started the command after %s; does the pool's bootstrap take runs (builtin:generic.sh does)?\n", time.Since(started).Round(time.Second))
			warned = true
		}
	}
}

// lost explains a run whose lease ended under it.
func (r *runner) lost(ctx context.Context, id string, err error) int {
	gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if v, gerr := r.c.GetLease(gctx, id, 0); gerr == nil && v.State != pool.LeaseActive {
		return r.fail(ExitHangar, "lease %s is %s: the command's instance is gone or no longer yours, and its exit status unknown", id, v.State)
	}
	return r.cutShort(ctx, id, ExitHangar, fmt.Sprintf("reading the output of lease %s: %v", id, err))
}

// renew keeps the lease alive while the command runs, at a third of its TTL.
func (r *runner) renew(ctx context.Context, v pool.LeaseView) {
	every := max(time.Until(v.ExpiresAt)/3, time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := r.c.Renew(ctx, v.ID); err != nil && ctx.Err() == nil {
				if !Transient(err) {
					return // the output stream says why
				}
				_, _ = fmt.Fprintf(r.stderr, "hangar: renewing lease %s: %v\n", v.ID, err)
			}
		}
	}
}

// Transient: an error the next try may not have (no answer, or a 5xx),
// and not a request given up on by its own caller.
func Transient(err error) bool {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Status >= http.StatusInternalServerError
	}
	return !errors.Is(err, context.Canceled)
}

// sleepCtx sleeps for d or until ctx ends; it reports whether it slept.
// orBackground is ctx, or context.Background() for a nil one, which Run
// has always accepted.
func orBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return hex.EncodeToString(b)
}
