package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	cirun "github.com/hangar-ci/hangar/ci/run"
)

// Exit codes of `hangar run` that are its own, not the command's.
const (
	exitNoInstance = cirun.ExitNoInstance
	exitHangar     = cirun.ExitHangar
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

func runCmd(g *globals) *cobra.Command {
	var o cirun.Options
	cmd := &cobra.Command{
		Use:   "run POOL [flags] -- COMMAND [ARG…]",
		Short: "Run a command on a leased instance, stream its output and exit with its status",
		Long:  runLong,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := parseRun(cmd, args, &o); err != nil {
				_, _ = fmt.Fprintf(g.stderr, "hangar: %v\n", err)
				return &statusError{code: exitHangar, err: err}
			}
			if code := cirun.Run(cmd.Context(), g.client(), o, g.stdout, g.stderr); code != 0 {
				return &statusError{code: code, err: fmt.Errorf("exit status %d", code)}
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		_, _ = fmt.Fprintf(g.stderr, "hangar: %v\n", err)
		return &statusError{code: exitHangar, err: err}
	})
	f := cmd.Flags()
	f.DurationVar(&o.Wait, "wait", cirun.DefaultWait, "how long to wait for an instance")
	f.BoolVar(&o.DiscardOnFailure, "discard-on-failure", false, "terminate the instance instead of reusing it when the command fails")
	f.DurationVar(&o.TTL, "ttl", 0, "lease time between renewals, which hangar run sends while the command runs (default: the pool's lease_ttl)")
	f.StringVar(&o.Lease, "lease", "", "run on this lease, which you hold, instead of leasing from POOL; it stays yours")
	f.BoolVarP(&o.Quiet, "quiet", "q", false, "print only the command's output and Hangar's errors")
	return cmd
}

// parseRun completes o from the arguments around --.
func parseRun(cmd *cobra.Command, args []string, o *cirun.Options) error {
	const usage = "usage: hangar run POOL [flags] -- COMMAND [ARG…], or hangar run --lease LEASE -- COMMAND [ARG…]"
	dash := cmd.ArgsLenAtDash()
	want := 1 // POOL before --
	if o.Lease != "" {
		want = 0
	}
	switch {
	case dash < 0:
		return fmt.Errorf("put -- before the command, so that its flags stay its own; %s", usage)
	case dash != want:
		return errors.New(usage)
	case len(args) == dash:
		return fmt.Errorf("no command after --; %s", usage)
	}
	if o.Lease == "" {
		o.Pool = args[0]
	}
	o.Command = args[dash:]
	return o.Check()
}
