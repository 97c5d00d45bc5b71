package main

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

	"github.com/spf13/cobra"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Exit codes of `hangar run` that are its own, not the command's. They
// follow sysexits (EX_TEMPFAIL) and `docker run` (125), so that a CI can
// tell "retry later" and "Hangar broke" from a failed build.
const (
	exitNoInstance = 75  // no instance could be had within --wait
	exitHangar     = 125 // Hangar failed; the command may not have run or finished
)

const runLong = `Run a command on an instance of POOL: lease one, run the command there in
place of the pool's worker (through the instance's bootstrap, which must
take runs: builtin:generic.sh does), stream its stdout and stderr, merged,
to stdout as it runs, release the lease and exit with the command's status.
The command gets no stdin. Every argument reaches the instance as it is,
never through a shell of this machine.

With --lease, run it on a lease you hold instead (hangar lease); the lease
is not released afterwards, so several commands can run one after the
other on the same instance.

Ctrl-C or SIGTERM releases the lease and discards its instance, which ends
the command; there is no other way to stop a command on its own.

Exit status: the command's (128+N when a signal N killed it); 75 when no
instance could be had within --wait; 125 when Hangar failed (bad request,
server unreachable, the lease lost before the command finished);
128+N when hangar run itself got signal N (130 for Ctrl-C).`

type runCommand struct {
	g                *globals
	c                *api.Client
	pool, lease      string
	argv             []string
	wait, ttl        time.Duration
	discardOnFailure bool
	quiet            bool
	caught           atomic.Int32 // the signal that interrupted the run
}

func runCmd(g *globals) *cobra.Command {
	rc := &runCommand{g: g}
	cmd := &cobra.Command{
		Use:   "run POOL [flags] -- COMMAND [ARG…]",
		Short: "Run a command on a leased instance, stream its output and exit with its status",
		Long:  runLong,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := rc.parse(cmd, args); err != nil {
				fmt.Fprintf(g.stderr, "hangar: %v\n", err)
				return &statusError{code: exitHangar, err: err}
			}
			if code := rc.run(cmd.Context()); code != 0 {
				return &statusError{code: code, err: fmt.Errorf("exit status %d", code)}
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		fmt.Fprintf(g.stderr, "hangar: %v\n", err)
		return &statusError{code: exitHangar, err: err}
	})
	f := cmd.Flags()
	f.DurationVar(&rc.wait, "wait", 10*time.Minute, "how long to wait for an instance")
	f.BoolVar(&rc.discardOnFailure, "discard-on-failure", false, "terminate the instance instead of reusing it when the command fails")
	f.DurationVar(&rc.ttl, "ttl", 0, "lease time between renewals, which hangar run sends while the command runs (default: the pool's lease_ttl)")
	f.StringVar(&rc.lease, "lease", "", "run on this lease, which you hold, instead of leasing from POOL; it stays yours")
	f.BoolVarP(&rc.quiet, "quiet", "q", false, "print only the command's output and Hangar's errors")
	return cmd
}

func (rc *runCommand) parse(cmd *cobra.Command, args []string) error {
	const usage = "usage: hangar run POOL [flags] -- COMMAND [ARG…], or hangar run --lease LEASE -- COMMAND [ARG…]"
	dash := cmd.ArgsLenAtDash()
	want := 1 // POOL before --
	if rc.lease != "" {
		want = 0
	}
	switch {
	case dash < 0:
		return fmt.Errorf("put -- before the command, so that its flags stay its own; %s", usage)
	case dash != want:
		return errors.New(usage)
	case len(args) == dash:
		return fmt.Errorf("no command after --; %s", usage)
	case rc.lease != "" && rc.discardOnFailure:
		return errors.New("--discard-on-failure needs hangar run to lease (POOL); with --lease, release your lease yourself")
	case rc.wait < 0 || rc.ttl < 0:
		return errors.New("--wait and --ttl must not be negative")
	}
	if rc.lease == "" {
		rc.pool = args[0]
	}
	rc.argv = args[dash:]
	rc.c = rc.g.client()
	return nil
}

func (rc *runCommand) say(format string, a ...any) {
	if !rc.quiet {
		fmt.Fprintf(rc.g.stderr, "hangar: "+format+"\n", a...)
	}
}

func (rc *runCommand) fail(code int, format string, a ...any) int {
	fmt.Fprintf(rc.g.stderr, "hangar: "+format+"\n", a...)
	return code
}

// run does the work and returns the exit status.
func (rc *runCommand) run(parent context.Context) int {
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithCancel(parent)
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
				rc.caught.Store(int32(s.(syscall.Signal)))
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
	if rc.lease != "" {
		v, code, over = rc.startRun(ctx)
	} else {
		v, code, over = rc.leaseAndWait(ctx)
	}
	if over {
		return code
	}
	if code, over = rc.stream(ctx, v); over {
		return code // the lease is over already, or was released
	}
	if rc.lease == "" {
		discard := rc.discardOnFailure && code != 0
		if err := rc.release(v.ID, discard); err != nil {
			fmt.Fprintf(rc.g.stderr, "hangar: the command exited with status %d; releasing lease %s failed: %v (it ends when its TTL runs out)\n", code, v.ID, err)
		} else if discard {
			rc.say("the command exited with status %d; lease %s released, its instance discarded", code, v.ID)
		} else {
			rc.say("the command exited with status %d; lease %s released", code, v.ID)
		}
	}
	return code
}

// interrupted reports whether a signal ended ctx, and which.
func (rc *runCommand) interrupted() (syscall.Signal, bool) {
	s := syscall.Signal(rc.caught.Load())
	return s, s != 0
}

var signalNames = map[syscall.Signal]string{syscall.SIGINT: "SIGINT", syscall.SIGTERM: "SIGTERM", syscall.SIGPIPE: "SIGPIPE"}

// cutShort ends the lease (if any) of a run that cannot go on and returns
// code. The instance is discarded: what the command left behind is unknown.
// The note is shown even with -q, since it explains the exit status.
func (rc *runCommand) cutShort(leaseID string, code int, why string) int {
	switch {
	case leaseID == "":
		return rc.fail(code, "%s before a lease was made", why)
	case rc.lease != "":
		// Not ours to keep, but a command cannot be stopped on its own.
		if err := rc.release(leaseID, true); err != nil {
			return rc.fail(code, "%s; ending lease %s failed: %v (it ends when its TTL runs out)", why, leaseID, err)
		}
		return rc.fail(code, "%s; lease %s ended (it was given with --lease), its instance discarded", why, leaseID)
	}
	if err := rc.release(leaseID, true); err != nil {
		return rc.fail(code, "%s; releasing lease %s failed: %v (it ends when its TTL runs out)", why, leaseID, err)
	}
	return rc.fail(code, "%s; lease %s released, its instance discarded", why, leaseID)
}

// interruptedBy returns the exit status and note for a signal.
func interruptedBy(sig syscall.Signal) (int, string) {
	return 128 + int(sig), "interrupted by " + signalNames[sig]
}

// release ends a lease, not waiting long for a server that does not answer.
func (rc *runCommand) release(id string, discard bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return rc.c.Release(ctx, id, discard)
}

// leaseAndWait asks for a lease with the command and waits for it to be
// active; when it cannot be had, it returns the exit status and over.
func (rc *runCommand) leaseAndWait(ctx context.Context) (v pool.LeaseView, code int, over bool) {
	req := api.LeaseRequest{Pool: rc.pool, Wait: "0s", Command: rc.argv, ClientToken: "run-" + randomHex(12)}
	if rc.ttl > 0 {
		req.TTL = rc.ttl.String()
	}
	v, err := rc.c.Lease(ctx, req)
	if err != nil {
		if sig, ok := rc.interrupted(); ok {
			// The server may have made the lease before we stopped
			// listening: the same client token finds it.
			bg, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			code, why := interruptedBy(sig)
			if v, err := rc.c.Lease(bg, req); err == nil {
				return v, rc.cutShort(v.ID, code, why), true
			}
			return v, rc.cutShort("", code, why), true
		}
		return v, rc.fail(exitHangar, "asking for an instance of pool %s: %v", rc.pool, err), true
	}
	deadline := time.Now().Add(rc.wait)
	announced := false
	for v.State == pool.LeasePending {
		left := time.Until(deadline)
		if left <= 0 {
			if err := rc.release(v.ID, false); err != nil {
				return v, rc.fail(exitNoInstance, "no instance of pool %s within %s; canceling lease %s failed: %v", rc.pool, rc.wait, v.ID, err), true
			}
			return v, rc.fail(exitNoInstance, "no instance of pool %s within %s; lease %s canceled", rc.pool, rc.wait, v.ID), true
		}
		if !announced {
			rc.say("waiting for an instance of pool %s (lease %s)", rc.pool, v.ID)
			announced = true
		}
		next, err := rc.c.GetLease(ctx, v.ID, min(left, time.Minute))
		if err != nil {
			if sig, ok := rc.interrupted(); ok {
				code, why := interruptedBy(sig)
				return v, rc.cutShort(v.ID, code, why), true
			}
			if !transient(err) {
				return v, rc.cutShort(v.ID, exitHangar, fmt.Sprintf("waiting for lease %s: %v", v.ID, err)), true
			}
			sleepCtx(ctx, time.Second) // a signal is seen at the next turn
			continue
		}
		v = next
	}
	if v.State != pool.LeaseActive {
		return v, rc.fail(exitNoInstance, "no instance of pool %s: lease %s is %s", rc.pool, v.ID, v.State), true
	}
	return v, 0, false
}

// startRun starts the command on the lease the caller holds.
func (rc *runCommand) startRun(ctx context.Context) (v pool.LeaseView, code int, over bool) {
	v, err := rc.c.StartRun(ctx, rc.lease, rc.argv)
	if err != nil {
		if sig, ok := rc.interrupted(); ok {
			// Whether the run started is unknown: end the lease, as for
			// any interrupted run.
			code, why := interruptedBy(sig)
			return v, rc.cutShort(rc.lease, code, why), true
		}
		return v, rc.fail(exitHangar, "starting the command on lease %s: %v", rc.lease, err), true
	}
	return v, 0, false
}

// stream copies the run's output to stdout until it exits, renewing the
// lease meanwhile, and returns the command's status; or, with over, the
// exit status of a run cut short, its lease then released or over.
func (rc *runCommand) stream(ctx context.Context, v pool.LeaseView) (code int, over bool) {
	if v.Instance != nil {
		rc.say("running on %s (%s) for lease %s", v.Instance.ID, v.Instance.PrivateIP, v.ID)
	}
	renewCtx, stopRenew := context.WithCancel(ctx)
	defer stopRenew()
	go rc.renew(renewCtx, v)

	run := 0
	if v.Run != nil {
		run = v.Run.ID
	}
	var offset int64
	epoch := ""
	started, warned := time.Now(), false
	var failingSince time.Time
	for {
		out, err := rc.c.Output(ctx, v.ID, run, offset, epoch, 30*time.Second)
		if err != nil {
			if sig, ok := rc.interrupted(); ok {
				code, why := interruptedBy(sig)
				return rc.cutShort(v.ID, code, why), true
			}
			if !transient(err) {
				return rc.lost(v.ID, err), true
			}
			// The server may be restarting; the run goes on meanwhile.
			if failingSince.IsZero() {
				failingSince = time.Now()
			} else if time.Since(failingSince) > 2*time.Minute {
				return rc.cutShort(v.ID, exitHangar, fmt.Sprintf("reading the output of lease %s failed for 2m: %v", v.ID, err)), true
			}
			sleepCtx(ctx, time.Second)
			continue
		}
		failingSince = time.Time{}
		if out.Reset {
			fmt.Fprintf(rc.g.stderr, "hangar: the Hangar server restarted; some output may be missing\n")
		}
		if out.Skipped > 0 {
			fmt.Fprintf(rc.g.stderr, "hangar: %d bytes of output were dropped: this reader fell more than %d MiB behind\n", out.Skipped, pool.MaxOutput>>20)
		}
		epoch, offset = out.Epoch, out.Next
		if _, err := rc.g.stdout.Write(out.Data); err != nil {
			return rc.cutShort(v.ID, 128+int(syscall.SIGPIPE), fmt.Sprintf("writing the command's output: %v", err)), true
		}
		if out.Done {
			return out.ExitCode, false
		}
		if !warned && out.State == pool.RunStarting && time.Since(started) > 2*time.Minute {
			fmt.Fprintf(rc.g.stderr, "hangar: the instance has not started the command after %s; does the pool's bootstrap take runs (builtin:generic.sh does)?\n", time.Since(started).Round(time.Second))
			warned = true
		}
	}
}

// lost explains a run whose lease ended under it.
func (rc *runCommand) lost(id string, err error) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if v, gerr := rc.c.GetLease(ctx, id, 0); gerr == nil && v.State != pool.LeaseActive {
		return rc.fail(exitHangar, "lease %s is %s: the command's instance is gone or no longer yours, and its exit status unknown", id, v.State)
	}
	return rc.cutShort(id, exitHangar, fmt.Sprintf("reading the output of lease %s: %v", id, err))
}

// renew keeps the lease alive while the command runs, at a third of its TTL.
func (rc *runCommand) renew(ctx context.Context, v pool.LeaseView) {
	every := max(time.Until(v.ExpiresAt)/3, time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := rc.c.Renew(ctx, v.ID); err != nil && ctx.Err() == nil {
				if !transient(err) {
					return // the output stream says why
				}
				fmt.Fprintf(rc.g.stderr, "hangar: renewing lease %s: %v\n", v.ID, err)
			}
		}
	}
}

// transient: an error the next try may not have (no answer, or a 5xx).
func transient(err error) bool {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Status >= http.StatusInternalServerError
	}
	return !errors.Is(err, context.Canceled)
}

// sleepCtx sleeps for d or until ctx ends; it reports whether it slept.
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
