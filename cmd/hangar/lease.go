package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	cirun "github.com/hangar-ci/hangar/ci/run"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

const leaseLong = `Lease an instance from POOL and print it (-o json: with the worker's
password, for scripts).

When no instance comes within --wait, the pending lease is canceled and
hangar lease exits 75, as hangar run does; with --keep-pending it stays
queued and hangar lease prints its id and exits 0, for scripts that wait
for it themselves (GET /v1/leases/ID?wait=60s) and must release it.
Ctrl-C or SIGTERM while waiting cancels the lease (exit 128+N). While it
waits, a terminal on stderr shows how things stand once a second.`

func leaseCmd(g *globals) *cobra.Command {
	var o leaseOptions
	cmd := &cobra.Command{
		Use:   "lease POOL",
		Short: "Lease an instance from a pool",
		Long:  leaseLong,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.req.Pool = args[0]
			if o.ttl > 0 {
				o.req.TTL = o.ttl.String()
			}
			if o.req.ClientToken == "" {
				// Retries of this invocation get the same lease, never a
				// second one held by nobody.
				o.req.ClientToken = "hangar-cli-" + rand.Text()
			}
			v, err := lease(cmd.Context(), g, o)
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(v)
			}
			if v.State == pool.LeasePending {
				_, err := fmt.Fprintf(g.stdout, "lease %s is still pending after %s; wait for it with the API (GET /v1/leases/%s?wait=60s) or release it\n", v.ID, o.wait, v.ID)
				return err
			}
			return printLease(g, v)
		},
	}
	f := cmd.Flags()
	f.DurationVar(&o.wait, "wait", 60*time.Second, "how long to wait for an instance")
	f.BoolVar(&o.keepPending, "keep-pending", false, "when --wait runs out, leave the lease queued (print it and exit 0) instead of canceling it")
	f.DurationVar(&o.ttl, "ttl", 0, "lease time before it must be renewed (default: the pool's lease_ttl)")
	f.StringVar(&o.req.Worker.Name, "worker-name", "", "worker name (default: generated)")
	f.StringVar(&o.req.Worker.Master, "master", "", "CI master address host:port handed to the worker")
	f.StringVar(&o.req.ClientToken, "client-token", "", "idempotency key: the same key (from the same API token) returns the same lease (default: random per invocation)")
	return cmd
}

type leaseOptions struct {
	req         api.LeaseRequest
	wait, ttl   time.Duration
	keepPending bool
}

// progressEvery is how often a terminal is told how a wait stands.
const progressEvery = time.Second

// lease asks for a lease and waits for it, canceling it when the wait runs
// out (unless o.keepPending) or a signal comes.
func lease(parent context.Context, g *globals, o leaseOptions) (pool.LeaseView, error) {
	ctx, caught, stop := withSignals(parent)
	defer stop()
	c := g.client()
	progress := newProgress(g.stderr, o.req.Pool)
	defer progress.done()
	// The server holds a request at most pool.MaxWait; a longer --wait
	// asks again.
	step := min(o.wait, pool.MaxWait)
	if progress != nil {
		step = min(step, progressEvery)
	}
	deadline := time.Now().Add(o.wait)
	req := o.req
	req.Wait = step.String()
	v, err := leaseRetrying(ctx, c, req)
	if err != nil {
		if sig := caught(); sig != 0 {
			// The server may have made the lease before we stopped
			// listening: the same client token finds it.
			bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			req.Wait = "0s"
			if v, err := c.Lease(bg, req); err == nil {
				return v, cancelLease(ctx, c, v, interruptedBy(sig, o.req.Pool))
			}
			end := interruptedBy(sig, o.req.Pool)
			return v, &statusError{say: true, code: end.code, err: errors.New(end.why + " before a lease was made")}
		}
		return v, err
	}
	for v.State == pool.LeasePending {
		left := time.Until(deadline)
		if left <= 0 {
			if o.keepPending {
				return v, nil
			}
			return v, cancelLease(ctx, c, v, leaseEnd{cirun.ExitNoInstance, fmt.Sprintf("no instance of pool %s within %s", o.req.Pool, o.wait)})
		}
		progress.show(ctx, c, v)
		next, err := c.GetLease(ctx, v.ID, min(left, step))
		if err != nil {
			if sig := caught(); sig != 0 {
				return v, cancelLease(ctx, c, v, interruptedBy(sig, o.req.Pool))
			}
			if !cirun.Transient(err) {
				return v, err
			}
			select {
			case <-time.After(time.Second):
			case <-ctx.Done():
			}
			continue
		}
		v = next
	}
	if sig := caught(); sig != 0 && v.State == pool.LeaseActive {
		// Interrupted as the lease came: nobody will use it.
		return v, cancelLease(ctx, c, v, interruptedBy(sig, o.req.Pool))
	}
	if v.State != pool.LeaseActive {
		return v, &statusError{say: true, code: cirun.ExitNoInstance, err: fmt.Errorf("no instance of pool %s: lease %s is %s", o.req.Pool, v.ID, v.State)}
	}
	return v, nil
}

// withSignals returns a context that SIGINT and SIGTERM end, a function
// telling which one did (0: none), and stop, which gives the signals back
// (Ctrl-C after hangar lease is done is the shell's again).
func withSignals(parent context.Context) (ctx context.Context, caught func() syscall.Signal, stop func()) {
	ctx, cancel := context.WithCancel(parent)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	var got syscall.Signal
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case s := <-sigs:
			got = s.(syscall.Signal)
			cancel()
		case <-ctx.Done():
		}
		signal.Stop(sigs)
	}()
	caught = func() syscall.Signal {
		if ctx.Err() == nil {
			return 0
		}
		cancel()
		<-done // got is written before done closes
		return got
	}
	stop = func() {
		cancel()
		<-done
	}
	return ctx, caught, stop
}

// leaseEnd is why hangar lease gives up, and its exit status.
type leaseEnd struct {
	code int
	why  string
}

func interruptedBy(sig syscall.Signal, poolName string) leaseEnd {
	return leaseEnd{128 + int(sig), fmt.Sprintf("interrupted by %s while waiting for an instance of pool %s", cirun.SignalNames[sig], poolName)}
}

// cancelLease ends lease v, which nobody will use, and returns the error
// that makes hangar lease exit as end says, telling what became of the
// lease.
func cancelLease(ctx context.Context, c *api.Client, v pool.LeaseView, end leaseEnd) error {
	code, why := end.code, end.why
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	ended := "canceled"
	if v.State == pool.LeaseActive {
		ended = "released"
	}
	if err := c.Release(bg, v.ID, false); err != nil {
		return &statusError{say: true, code: code, err: fmt.Errorf("%s; canceling lease %s failed: %w (it ends when it is no longer waited for)", why, v.ID, err)}
	}
	return &statusError{say: true, code: code, err: fmt.Errorf("%s; lease %s %s", why, v.ID, ended)}
}

// leaseRetrying asks for a lease, asking again with the same client token
// when the request never got an answer (a connection cut, a server
// restarting): the server then returns the lease it may already have made.
func leaseRetrying(ctx context.Context, c *api.Client, req api.LeaseRequest) (pool.LeaseView, error) {
	delay := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		v, err := c.Lease(ctx, req)
		var apiErr *api.Error
		if err == nil || errors.As(err, &apiErr) || attempt == 4 || ctx.Err() != nil {
			return v, err
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return v, err
		}
		delay *= 2
	}
}

// progress shows a wait on a terminal: one line, rewritten in place.
type progress struct {
	w     io.Writer
	pool  string
	start time.Time
	shown bool
}

// newProgress returns nil unless w is a terminal.
func newProgress(w io.Writer, poolName string) *progress {
	if !isTerminal(w) {
		return nil
	}
	return &progress{w: w, pool: poolName, start: time.Now()}
}

// isTerminal reports whether w is a terminal, where lines rewritten in
// place (\r) show as meant; in a file or a CI log they pile up.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// show tells how the wait stands, after its first second.
func (p *progress) show(ctx context.Context, c *api.Client, v pool.LeaseView) {
	if p == nil || time.Since(p.start) < progressEvery {
		return
	}
	booting := "no instance booting"
	pools, err := c.Pools(ctx)
	for _, pv := range pools {
		if pv.Name == p.pool && err == nil {
			n := pv.Instances[pool.Launching] + pv.Instances[pool.Booting] + pv.Instances[pool.Starting]
			if n > 0 {
				booting = fmt.Sprintf("%d booting", n)
			}
		}
	}
	// \r and erase-to-end-of-line: the line is rewritten in place.
	_, _ = fmt.Fprintf(p.w, "\r\x1b[Kwaiting for pool %s: %s, %d ahead of you, %s", p.pool, booting, v.Ahead, time.Since(p.start).Round(time.Second))
	p.shown = true
}

func (p *progress) done() {
	if p != nil && p.shown {
		_, _ = io.WriteString(p.w, "\r\x1b[K")
	}
}
