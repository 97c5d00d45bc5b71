package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/sim"
	"github.com/spf13/cobra"
)

// defaultBoot is the boot time simulated when neither the flags nor the
// providers' boot_delay say: about what an EC2 instance takes to run its
// user-data.
const defaultBoot = time.Minute

func simulateCmd(g *globals) *cobra.Command {
	var configPath, tracePath, poolName, bootFlag, bootDist, policy string
	var grid bool
	var seed uint64
	cmd := &cobra.Command{
		Use:   "simulate --config FILE --trace FILE",
		Short: "Run a trace of CI jobs through the real pool code on a virtual clock: what each policy costs, and how long jobs wait",
		Long: `Run a trace of CI jobs through Hangar's real pool manager (its state
machine, dispatch and reaper) under a virtual clock, against a simulated
cloud whose instances take the boot time to boot. A day of trace runs in
seconds.

The trace is CSV with a header: submit_s (seconds from its start), duration_s
and optionally pool. Each job leases an instance with an unlimited wait,
holds it for its duration and releases it for reuse.

Policies: on-demand (no warm pool: every job boots an instance of its own,
which ends with it), config (the pools as configured), auto (min_idle =
"auto": the pool sizes its spares itself), all (the three). --grid adds the
fixed min_idle × idle_ttd grid and its Pareto frontier (instance-hours vs
p95 wait). Each is set against the oracle: a clairvoyant schedule with no
wait at all.`,
		Example: `  hangar simulate --config hangar.toml --trace pool/sim/traces/synthetic.csv
  hangar simulate --config hangar.toml --trace jobs.csv --pool linux --boot 90s --grid -o json`,
		Args: cobra.NoArgs,
		// Its own, so that -o csv is allowed here.
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if g.output != "table" && g.output != "json" && g.output != "csv" {
				return fmt.Errorf("-o must be table, json or csv, not %q", g.output)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if tracePath == "" {
				return errors.New("--trace is required: a CSV of submit_s,duration_s[,pool]")
			}
			policies, err := simPolicies(policy)
			if err != nil {
				return err
			}
			cfg, err := loadConfig(configPath)
			if err != nil {
				return err
			}
			trace, err := readSimTrace(g, tracePath)
			if err != nil {
				return err
			}
			names, err := simPools(cfg, &trace, tracePath, poolName)
			if err != nil {
				return err
			}
			o := sim.Options{Pools: map[string]pool.Spec{}, Seed: seed}
			for _, name := range names {
				o.Pools[name] = poolSpec(name, cfg.Pools[name])
				// A pool far smaller than the trace's load measures its
				// queue, not its warm pool: say so before the numbers do.
				if peak, most := trace.Peak(name), o.Pools[name].MaxInstances; most < peak {
					_, _ = fmt.Fprintf(g.stderr, "hangar: pool %s: max_instances %d is below the %d jobs the trace runs at once at its peak; its waits are mostly queueing behind busy instances (raise max_instances in the config to compare warm pools)\n", name, most, peak)
				}
			}
			if o.Boot, err = simBoot(cfg, names, bootFlag, bootDist); err != nil {
				return err
			}
			if grid {
				policies = append(policies, sim.Grid(o)...)
			}
			if isTerminal(g.stderr) {
				o.Progress = func(done, total int) {
					_, _ = fmt.Fprintf(g.stderr, "\rsimulating: %d%%", done*100/total)
				}
			}
			ctx := cmd.Context()
			if ctx == nil {
				ctx = context.Background()
			}
			rep, err := sim.Run(ctx, trace, o, policies)
			if o.Progress != nil {
				_, _ = fmt.Fprint(g.stderr, "\r\033[K")
			}
			if err != nil {
				return err
			}
			switch g.output {
			case "json":
				return rep.WriteJSON(g.stdout)
			case "csv":
				return rep.WriteCSV(g.stdout)
			}
			return rep.WriteTable(g.stdout)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "config file (default ./hangar.toml, else the built-in local config)")
	f.StringVar(&tracePath, "trace", "", "trace of jobs: CSV of submit_s,duration_s[,pool], gzip-compressed or not")
	f.StringVar(&poolName, "pool", "", "the config's pool whose settings apply (with a pool column: only that pool's rows)")
	f.StringVar(&bootFlag, "boot", "", "boot time of every instance (default: the provider's boot_delay, else 60s)")
	f.StringVar(&bootDist, "boot-dist", "", "file of observed boot times, seconds, one a line: each boot is drawn from them")
	f.StringVar(&policy, "policy", "all", "on-demand, config, auto or all")
	f.BoolVar(&grid, "grid", false, "also sweep fixed min_idle × idle_ttd and print the Pareto frontier")
	f.Uint64Var(&seed, "seed", 1, "seed of the boot samples and the pool's ids: the same seed, the same report")
	cmd.AddCommand(simulateGenCmd(g))
	return cmd
}

func simPolicies(name string) ([]sim.Policy, error) {
	switch name {
	case "on-demand":
		return []sim.Policy{sim.OnDemand()}, nil
	case "config":
		return []sim.Policy{sim.Config()}, nil
	case "auto":
		return []sim.Policy{sim.Auto()}, nil
	case "all":
		return []sim.Policy{sim.OnDemand(), sim.Config(), sim.Auto()}, nil
	}
	return nil, fmt.Errorf("--policy must be on-demand, config, auto or all, not %q", name)
}

func readSimTrace(g *globals, path string) (sim.Trace, error) {
	rc, err := sim.OpenTrace(path)
	if err != nil {
		return sim.Trace{}, err
	}
	defer func() { _ = rc.Close() }() // read only
	t, err := sim.ReadTrace(rc, path)
	if err != nil {
		return sim.Trace{}, err
	}
	if t.Unsorted != 0 {
		_, _ = fmt.Fprintf(g.stderr, "hangar: trace %s: its rows are not in submit_s order (line %d is earlier than the row above it); simulating them sorted\n", path, t.Unsorted)
	}
	return t, nil
}

// simPools decides which of the config's pools the trace's jobs go to, and
// fills in the jobs' pool where the trace has none: --pool, else the
// trace's pool column, else the config's one pool.
func simPools(cfg configs.Config, t *sim.Trace, path, only string) ([]string, error) {
	configured := slices.Sorted(func(yield func(string) bool) {
		for name := range cfg.Pools {
			if !yield(name) {
				return
			}
		}
	})
	if only != "" {
		if _, ok := cfg.Pools[only]; !ok {
			return nil, fmt.Errorf("--pool %s: the config has no such pool (pools: %s)", only, strings.Join(configured, ", "))
		}
		if t.HasPool {
			kept := t.Jobs[:0]
			for _, j := range t.Jobs {
				if j.Pool == only {
					kept = append(kept, j)
				}
			}
			if len(kept) == 0 {
				return nil, fmt.Errorf("trace %s has no jobs of pool %s", path, only)
			}
			t.Jobs = kept
			return []string{only}, nil
		}
	} else if t.HasPool {
		for _, j := range t.Jobs {
			if _, ok := cfg.Pools[j.Pool]; !ok {
				return nil, fmt.Errorf("trace %s:%d: pool %q is not in the config (pools: %s)", path, j.Line, j.Pool, strings.Join(configured, ", "))
			}
		}
		return t.Pools(), nil
	} else {
		switch len(configured) {
		case 0:
			return nil, errors.New("the config has no pools to simulate")
		case 1:
			only = configured[0]
		default:
			return nil, fmt.Errorf("the trace has no pool column and the config has pools %s: choose one with --pool", strings.Join(configured, ", "))
		}
	}
	for i := range t.Jobs {
		t.Jobs[i].Pool = only
	}
	return []string{only}, nil
}

// simBoot is the boot time: --boot, --boot-dist, else the simulated pools'
// providers' boot_delay (which must agree), else a minute.
func simBoot(cfg configs.Config, pools []string, fixed, dist string) (sim.Boot, error) {
	switch {
	case fixed != "" && dist != "":
		return sim.Boot{}, errors.New("--boot and --boot-dist: give one")
	case fixed != "":
		d, err := time.ParseDuration(fixed)
		if err != nil || d <= 0 {
			return sim.Boot{}, fmt.Errorf("--boot %q: want a positive duration such as 60s or 2m", fixed)
		}
		return sim.Boot{Fixed: d}, nil
	case dist != "":
		f, err := os.Open(dist)
		if err != nil {
			return sim.Boot{}, fmt.Errorf("--boot-dist: %w", err)
		}
		defer func() { _ = f.Close() }() // read only
		samples, err := sim.ReadBootDist(f, dist)
		if err != nil {
			return sim.Boot{}, err
		}
		return sim.Boot{Samples: samples}, nil
	}
	boot, from := time.Duration(0), ""
	for _, name := range pools {
		prov := cfg.Pools[name].Provider
		d := cfg.Providers[prov].BootDelay.Duration
		if from != "" && d != boot {
			return sim.Boot{}, fmt.Errorf("pools %s and %s boot differently (boot_delay of their providers); give --boot", from, name)
		}
		boot, from = d, name
	}
	if boot <= 0 {
		boot = defaultBoot
	}
	return sim.Boot{Fixed: boot}, nil
}
