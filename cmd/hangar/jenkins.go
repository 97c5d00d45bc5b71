package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"

	"github.com/hangar-ci/hangar/ci/jenkins"
	"github.com/hangar-ci/hangar/configs"
	"github.com/spf13/cobra"
)

func jenkinsCmd(g *globals) *cobra.Command {
	var path string
	var debug bool
	cmd := &cobra.Command{
		Use:   "jenkins",
		Short: "Run `hangar serve`, and give Jenkins inbound agents to the pools with a [pools.NAME.jenkins] table",
		Long: "hangar jenkins is hangar serve plus a watcher per pool with a [pools.NAME.jenkins] table: it polls\n" +
			"the controller's build queue and, for builds waiting for the pool's label, creates inbound nodes and\n" +
			"leases instances that run their agents; a node idle for the pool's idle_ttd is deleted and its\n" +
			"instance released. It stops at once if a controller refuses its credentials.",
		Args: cobra.NoArgs,
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
			// Before the server starts: nothing is launched for a
			// controller that refuses the credentials.
			pools, err := jenkinsPools(ctx, cfg, log)
			if err != nil {
				return err
			}
			s, err := startServer(ctx, cfg, serveOptions{Logger: log})
			if err != nil {
				return err
			}
			j, err := startJenkins(s, pools)
			if err != nil {
				return errors.Join(err, s.Close())
			}
			<-ctx.Done()
			log.Info("shutting down; nodes and instances stay, and are adopted at the next start")
			j.Close()
			return s.Close()
		},
	}
	cmd.Flags().StringVar(&path, "config", "", "config file (default ./hangar.toml if present, else the embedded local default)")
	cmd.Flags().BoolVar(&debug, "debug", false, "log every API request")
	return cmd
}

// jenkinsRun is the watchers of one server.
type jenkinsRun struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// jenkinsPools returns the watcher options of every pool with a jenkins
// table, the server's parts left out, having checked each controller's
// answer to the credentials. One that refuses them is an error; one that
// cannot be reached yet is only logged: the watcher tries at every poll.
func jenkinsPools(ctx context.Context, cfg configs.Config, log *slog.Logger) ([]jenkins.Options, error) {
	var out []jenkins.Options
	var problems []error
	for _, name := range slices.Sorted(maps.Keys(cfg.Pools)) {
		pc := cfg.Pools[name]
		if !pc.Jenkins.Enabled() {
			continue
		}
		token, err := pc.Jenkins.APIToken()
		if err != nil {
			problems = append(problems, fmt.Errorf("pool %s: %w", name, err))
			continue
		}
		j := pc.Jenkins.WithDefaults(name)
		c := &jenkins.Client{URL: j.URL, User: j.User, Token: token}
		if user, err := c.Whoami(ctx); errors.Is(err, jenkins.ErrAuth) {
			problems = append(problems, fmt.Errorf("jenkins %s for pool %s: %w", j.URL, name, err))
			continue
		} else if err != nil {
			log.Warn("jenkins controller not reachable yet; retrying at every poll", "pool", name, "jenkins", j.URL, "err", err)
		} else {
			log.Info("jenkins controller reachable", "pool", name, "jenkins", j.URL, "user", user, "label", j.Label)
		}
		out = append(out, jenkins.Options{
			Pool:     name,
			Jenkins:  jenkinsConfig(name, pc.Jenkins),
			IdleTTD:  pc.IdleTTD.Duration,
			LeaseTTL: pc.LeaseTTL.Duration,
			Token:    token,
		})
	}
	if err := errors.Join(problems...); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("no pool has a [pools.NAME.jenkins] table: `hangar jenkins` has nothing to watch (`hangar serve` runs pools without one)")
	}
	return out, nil
}

// jenkinsConfig maps a pool's [pools.NAME.jenkins] table to the watcher's
// Config, the table's defaults filled in; the token is resolved apart.
func jenkinsConfig(pool string, t configs.Jenkins) jenkins.Config {
	t = t.WithDefaults(pool)
	return jenkins.Config{
		URL:            t.URL,
		User:           t.User,
		Label:          t.Label,
		NodePrefix:     t.NodePrefix,
		RemoteFS:       t.RemoteFS,
		PollInterval:   t.PollInterval.Duration,
		ConnectTimeout: t.ConnectTimeout.Duration,
	}
}

// startJenkins runs a watcher per pool on the pool manager of s.
func startJenkins(s *server, pools []jenkins.Options) (*jenkinsRun, error) {
	var watchers []*jenkins.Watcher
	for _, o := range pools {
		o.Leaser = jenkins.ManagerLeaser{M: s.manager}
		o.Logger = s.log.With("component", "jenkins")
		w, err := jenkins.New(o)
		if err != nil {
			return nil, err
		}
		watchers = append(watchers, w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &jenkinsRun{cancel: cancel}
	for _, w := range watchers {
		j.wg.Add(1)
		go func() {
			defer j.wg.Done()
			w.Run(ctx)
		}()
	}
	return j, nil
}

// Close stops the watchers. Their nodes and leases stay: the next start
// adopts them.
func (j *jenkinsRun) Close() {
	j.cancel()
	j.wg.Wait()
}
