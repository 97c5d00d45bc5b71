package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/spf13/cobra"
)

// run executes the CLI and returns the process's exit code.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		var st *statusError
		if errors.As(err, &st) {
			if st.say {
				_, _ = fmt.Fprintln(stderr, "hangar: "+oneLine(err))
			}
			return st.code
		}
		_, _ = fmt.Fprintln(stderr, "hangar: "+oneLine(err)) // nowhere else to say it
		return 1
	}
	return 0
}

// oneLine keeps an error to one line for the terminal; joined errors (a
// config with several problems) keep their lines, indented.
func oneLine(err error) string {
	return strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "\n  ")
}

type globals struct {
	server string
	token  string
	output string
	stdout io.Writer
	stderr io.Writer
}

func (g *globals) client() *api.Client {
	return &api.Client{BaseURL: serverURL(g.server), Token: g.token}
}

// serverURL takes --server localhost:7878 as http://localhost:7878, as
// curl does.
func serverURL(s string) string {
	if strings.Contains(s, "://") {
		return s
	}
	return "http://" + s
}

func (g *globals) json() bool { return g.output == "json" }

func (g *globals) printJSON(v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (g *globals) table(header string, rows [][]string) error {
	var b strings.Builder
	b.WriteString(header + "\n")
	for _, r := range rows {
		b.WriteString(strings.Join(r, "\t") + "\n")
	}
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}
	return w.Flush()
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:           "hangar",
		Short:         "Pools of CI build instances, leased on demand",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if g.output != "table" && g.output != "json" {
				return fmt.Errorf("-o must be table or json, not %q", g.output)
			}
			return nil
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.StringVar(&g.server, "server", envOr("HANGAR_SERVER", "http://127.0.0.1:7878"), "Hangar server URL (env HANGAR_SERVER)")
	pf.StringVar(&g.token, "token", os.Getenv("HANGAR_TOKEN"), "API bearer token (env HANGAR_TOKEN)")
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")

	root.AddCommand(serveCmd(g), leaseCmd(g), leasesCmd(g), releaseCmd(g), poolsCmd(g), instancesCmd(g), scaleCmd(g),
		drainCmd(g), consoleCmd(g), cacheCmd(g), imageCmd(g), userdataCmd(g), configCmd(g), localCmd(g), stagingCmd(g))
	root.AddCommand(runCmd(g))
	root.AddCommand(jenkinsCmd(g))
	root.AddCommand(versionCmd(g))
	root.AddCommand(simulateCmd(g))
	return root
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// loadConfig reads --config, else ./hangar.toml if present, else the
// embedded local default.
func loadConfig(path string) (configs.Config, error) {
	if path != "" {
		return configs.Load(path)
	}
	if _, err := os.Stat("hangar.toml"); err == nil {
		return configs.Load("hangar.toml")
	}
	return configs.LoadDefault()
}

func serveCmd(g *globals) *cobra.Command {
	var path string
	var debug bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the pools and serve the lease API",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: level}))
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			s, err := startServer(ctx, cfg, serveOptions{Logger: log})
			if err != nil {
				return err
			}
			<-ctx.Done()
			log.Info("shutting down; instances keep running and are adopted at the next start")
			return s.Close()
		},
	}
	cmd.Flags().StringVar(&path, "config", "", "config file (default ./hangar.toml if present, else the embedded local default)")
	cmd.Flags().BoolVar(&debug, "debug", false, "log every API request")
	return cmd
}

func leasesCmd(g *globals) *cobra.Command {
	var poolName, state string
	cmd := &cobra.Command{
		Use:   "leases",
		Short: "List your leases (an admin token: everyone's)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			list, err := g.client().Leases(cmd.Context(), poolName, pool.LeaseState(state))
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(list)
			}
			var rows [][]string
			for _, v := range list {
				inst := "-"
				if v.Instance != nil {
					inst = v.Instance.ID
				}
				rows = append(rows, []string{v.ID, v.Pool, string(v.State), inst, orDash(v.Owner), v.Worker.Name,
					v.CreatedAt.Local().Format(time.DateTime), v.ExpiresAt.Local().Format(time.DateTime)})
			}
			return g.table("LEASE\tPOOL\tSTATE\tINSTANCE\tOWNER\tWORKER\tCREATED\tEXPIRES", rows)
		},
	}
	cmd.Flags().StringVar(&poolName, "pool", "", "only this pool")
	cmd.Flags().StringVar(&state, "state", "", "only this state: pending, active, released, expired, canceled or lost")
	return cmd
}

func printLease(g *globals, v pool.LeaseView) error {
	inst, ip := "", ""
	if v.Instance != nil {
		inst, ip = v.Instance.ID, v.Instance.PrivateIP
	}
	// The worker password is only in -o json: tables end up in CI logs.
	return g.table("LEASE\tPOOL\tSTATE\tINSTANCE\tIP\tWORKER\tEXPIRES", [][]string{{v.ID, v.Pool, string(v.State), inst, ip, v.Worker.Name, v.ExpiresAt.Local().Format(time.DateTime)}})
}

func releaseCmd(g *globals) *cobra.Command {
	var discard bool
	cmd := &cobra.Command{
		Use:   "release LEASE",
		Short: "Give a leased instance back (or discard it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			if err := c.Release(cmd.Context(), args[0], discard); err != nil {
				return err
			}
			if !g.json() {
				_, err := fmt.Fprintf(g.stdout, "released %s\n", args[0])
				return err
			}
			// The lease as it ended: released, or canceled if it was
			// still pending.
			v, err := c.GetLease(cmd.Context(), args[0], 0)
			if err != nil {
				return fmt.Errorf("released %s, but reading it back failed: %w", args[0], err)
			}
			return g.printJSON(v)
		},
	}
	cmd.Flags().BoolVar(&discard, "discard", false, "terminate the instance instead of reusing it")
	return cmd
}

func poolsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "pools",
		Short: "List pools",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			pools, err := g.client().Pools(cmd.Context())
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(pools)
			}
			var rows [][]string
			for _, p := range pools {
				note := p.LaunchError
				if p.LaunchBlocked {
					note = "LAUNCHES STOPPED (quota): " + note
				}
				if p.ImageCopy != "" {
					note = strings.TrimSuffix(p.ImageCopy+"; "+note, "; ")
				}
				for _, n := range p.CloudNotes {
					note = strings.TrimPrefix(note+"; note: "+n, "; ")
				}
				min, max := limits(p)
				rows = append(rows, []string{p.Name, p.Provider, min, max,
					countStates(p.Instances), fmt.Sprint(p.LeasesActive), fmt.Sprint(p.LeasesPending), note})
			}
			return g.table("POOL\tPROVIDER\tMIN_IDLE\tMAX\tINSTANCES\tLEASED\tPENDING\tLAUNCH_ERROR", rows)
		},
	}
}

func countStates(m map[pool.State]int) string {
	var parts []string
	for s, n := range m {
		parts = append(parts, fmt.Sprintf("%d %s", n, s))
	}
	sort.Strings(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func instancesCmd(g *globals) *cobra.Command {
	var poolName string
	cmd := &cobra.Command{
		Use:   "instances",
		Short: "List instances",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			list, err := g.client().Instances(cmd.Context(), poolName)
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(list)
			}
			var rows [][]string
			for _, in := range list {
				rows = append(rows, []string{orDash(in.ID), in.Pool, string(in.State), orDash(in.PrivateIP), orDash(in.LeaseID),
					fmt.Sprint(in.Uses), time.Since(in.Since).Round(time.Second).String(), string(in.Reason)})
			}
			return g.table("INSTANCE\tPOOL\tSTATE\tIP\tLEASE\tUSES\tFOR\tREASON", rows)
		},
	}
	cmd.Flags().StringVar(&poolName, "pool", "", "only this pool")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

const scaleLong = `Change a pool's min_idle and max_instances at run time.

The new limits are kept in the server's store: they outlive restarts and
override the config's min_idle and max_instances, which then change nothing
until the override is dropped. hangar pools shows an overridden limit as
"3 (scaled; config 5)", and serve logs every override when it starts.
--reset drops the override: the config's limits apply again.`

func scaleCmd(g *globals) *cobra.Command {
	var minIdle, max int
	var reset bool
	cmd := &cobra.Command{
		Use:   "scale POOL (--min-idle N | --max N | --reset)",
		Short: "Change a pool's min_idle and max_instances at run time, over the config's",
		Long:  scaleLong,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.ScaleRequest{Reset: reset}
			if cmd.Flags().Changed("min-idle") {
				req.MinIdle = &minIdle
			}
			if cmd.Flags().Changed("max") {
				req.MaxInstances = &max
			}
			given := req.MinIdle != nil || req.MaxInstances != nil
			switch {
			case reset && given:
				return errors.New("--reset goes back to the config's limits; give it without --min-idle and --max")
			case !reset && !given:
				return errors.New("give --min-idle, --max or both, or --reset")
			}
			p, err := g.client().Scale(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(p)
			}
			min, max := limits(p)
			_, err = fmt.Fprintf(g.stdout, "pool %s: min_idle %s, max_instances %s\n", p.Name, min, max)
			return err
		},
	}
	cmd.Flags().IntVar(&minIdle, "min-idle", 0, "warm spares to keep")
	cmd.Flags().IntVar(&max, "max", 0, "most instances the pool may have")
	cmd.Flags().BoolVar(&reset, "reset", false, "drop the run-time limits: the config's apply again")
	return cmd
}

// limits shows a pool's min_idle and max_instances, and where they differ
// from the config's because of hangar scale. An autoscaled pool's min_idle
// is its current target and why: "auto: 4 (rate 2.1/min, boot 58s)".
func limits(p pool.PoolView) (minIdle, maxInstances string) {
	show := func(n, config int) string {
		switch {
		case !p.Scaled || p.Config == nil:
			return fmt.Sprint(n)
		case n == config:
			return fmt.Sprintf("%d (scaled)", n)
		default:
			return fmt.Sprintf("%d (scaled; config %d)", n, config)
		}
	}
	var c pool.PoolLimits
	if p.Config != nil {
		c = *p.Config
	}
	minIdle, maxInstances = show(p.MinIdle, c.MinIdle), show(p.MaxInstances, c.MaxInstances)
	if a := p.Autoscale; a != nil {
		minIdle = fmt.Sprintf("auto: %d (%s)", a.TargetIdle, a.Reason)
	}
	return minIdle, maxInstances
}

func drainCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "drain INSTANCE",
		Short: "Take an instance out of service (after its lease, if it has one)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := g.client().Drain(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(v)
			}
			_, err = fmt.Fprintf(g.stdout, "instance %s is %s\n", v.ID, v.State)
			return err
		},
	}
}

func consoleCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "console INSTANCE",
		Short: "Print an instance's console output",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out, err := g.client().Console(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(map[string]string{"id": args[0], "output": out})
			}
			_, err = io.WriteString(g.stdout, out)
			return err
		},
	}
}

func userdataCmd(g *globals) *cobra.Command {
	ud := &cobra.Command{Use: "userdata", Short: "User-data tools"}
	var path string
	render := &cobra.Command{
		Use:   "render POOL",
		Short: "Print the user-data an instance of POOL boots with (token replaced by a placeholder)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			b, err := renderUserData(cfg, args[0])
			if err != nil {
				return err
			}
			_, err = g.stdout.Write(b)
			return err
		},
	}
	render.Flags().StringVar(&path, "config", "", "config file (default as for serve)")
	ud.AddCommand(render)
	return ud
}

func configCmd(g *globals) *cobra.Command {
	c := &cobra.Command{Use: "config", Short: "Config tools"}
	var offline bool
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Check a config file and report every problem, all that `hangar serve` would refuse",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			load := configs.Check
			if offline {
				load = configs.Load
			}
			cfg, err := load(args[0])
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "%s: ok (%d providers, %d pools)\n", args[0], len(cfg.Providers), len(cfg.Pools))
			return err
		},
	}
	check.Flags().BoolVar(&offline, "offline", false, "away from the machine that serves: skip the token secrets that are not there and the TLS files")
	c.AddCommand(check)
	return c
}

func localCmd(g *globals) *cobra.Command {
	c := &cobra.Command{Use: "local", Short: "Tools for the embedded local cloud"}
	var path string
	down := &cobra.Command{
		Use:   "terminate-all",
		Short: "Terminate every local-cloud instance under the config's data_dir (they outlive `hangar serve`, as cloud instances do)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			dir := filepath.Join(cfg.Server.DataDir, "local")
			if _, err := os.Stat(dir); err != nil {
				_, err := fmt.Fprintf(g.stdout, "no local cloud at %s\n", dir)
				return err
			}
			p, err := local.New(cmd.Context(), local.Options{Dir: dir})
			if err != nil {
				return err
			}
			defer func() { _ = p.Close() }() // its API server only; the instances outlive it
			list, err := p.List(cmd.Context(), nil)
			if err != nil {
				return err
			}
			var ids []string
			for _, in := range list {
				if in.State != cloud.StateTerminated {
					ids = append(ids, in.ID)
				}
			}
			done, err := p.Terminate(cmd.Context(), ids)
			if _, werr := fmt.Fprintf(g.stdout, "terminated %d instances\n", len(done)); err == nil {
				err = werr
			}
			return err
		},
	}
	down.Flags().StringVar(&path, "config", "", "config file (default as for serve)")
	c.AddCommand(down)
	return c
}
