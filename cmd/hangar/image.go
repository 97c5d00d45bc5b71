package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/pool"
)

// imageCmd is `hangar image`: the images baked for pools. Like `hangar
// staging` it works on the config's providers directly; bake also tells a
// running server (--server) to launch from the new image.
func imageCmd(g *globals) *cobra.Command {
	var path string
	c := &cobra.Command{
		Use:   "image",
		Short: "Images baked for pools: bake, list, prune",
	}
	c.PersistentFlags().StringVar(&path, "config", "", "config file (default as for serve)")
	var roll bool
	bake := &cobra.Command{
		Use:   "bake POOL",
		Short: "Bake an image for a pool: its [bake] script, run as root on a staging server booted from the pool's image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withPoolStaging(cmd, g, path, args[0], func(ctx context.Context, m *staging.Manager, pc configs.Pool) error {
				return bakeImage(ctx, g, m, args[0], pc, roll)
			})
		},
	}
	bake.Flags().BoolVar(&roll, "roll", false, "replace the pool's idle instances on older images at once")
	var poolName string
	list := &cobra.Command{
		Use:   "list",
		Short: "List the images baked for the config's pools, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return listImages(cmd, g, path, poolName)
		},
	}
	list.Flags().StringVar(&poolName, "pool", "", "only this pool's")
	var keep int
	prune := &cobra.Command{
		Use:   "prune POOL",
		Short: "Delete a pool's baked images beyond the newest --keep, except those an instance runs from",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if keep < 1 {
				return errors.New("--keep must be ≥ 1: the newest image is the one the pool launches from")
			}
			return withPoolStaging(cmd, g, path, args[0], func(ctx context.Context, m *staging.Manager, _ configs.Pool) error {
				deleted, err := pruneImages(ctx, m, args[0], keep, "")
				for _, id := range deleted {
					_, _ = fmt.Fprintf(g.stdout, "deleted image %s\n", id)
				}
				return err
			})
		},
	}
	prune.Flags().IntVar(&keep, "keep", 0, "how many of the newest images to keep (required)")
	_ = prune.MarkFlagRequired("keep")
	c.AddCommand(bake, list, prune)
	return c
}

// withPoolStaging runs fn with a staging manager on poolName's provider,
// interrupted by SIGINT/SIGTERM, closing the manager (on_exit) after.
func withPoolStaging(cmd *cobra.Command, g *globals, path, poolName string, fn func(context.Context, *staging.Manager, configs.Pool) error) error {
	cfg, err := loadConfig(path)
	if err != nil {
		return err
	}
	pc, ok := cfg.Pools[poolName]
	if !ok {
		return fmt.Errorf("no pool %q in the config", poolName)
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m, s, err := openStaging(ctx, g, path, pc.Provider, "")
	if err != nil {
		return err
	}
	err = fn(ctx, m, pc)
	stop()
	if cerr := s.close(cmd.Context()); cerr != nil {
		if err == nil {
			return cerr
		}
		_, _ = fmt.Fprintln(g.stderr, "hangar: "+oneLine(cerr))
	}
	return err
}

// bakeImage boots a staging server from the pool's image, runs the bake
// script on it as root, stops it, makes an image of it and prunes older
// ones. The server is terminated whatever happens; a failed script makes
// no image and ends the command with the script's status.
func bakeImage(ctx context.Context, g *globals, m *staging.Manager, poolName string, pc configs.Pool, roll bool) (err error) {
	if pc.Bake == nil {
		return fmt.Errorf("pool %s has no [bake] table", poolName)
	}
	script, err := os.ReadFile(pc.Bake.Script)
	if err != nil {
		return fmt.Errorf("reading the bake script: %w", err)
	}
	start := time.Now()
	step := func(format string, a ...any) {
		_, _ = fmt.Fprintf(g.stderr, "hangar: [%5.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	name := "hangar-" + poolName + "-" + stamp

	step("boot: a staging server from %s", firstNonEmpty(pc.Image, "the staging default image"))
	srv, err := m.ProvisionServer(ctx, staging.ServerSpec{Name: "bake-" + poolName + "-" + stamp, Image: pc.Image})
	if err != nil {
		return err
	}
	terminated := false
	defer func() {
		// Whatever happened, the server goes: a bake leaves nothing running.
		if terminated {
			return
		}
		if terr := m.TerminateServer(context.WithoutCancel(ctx), srv); terr != nil {
			err = errors.Join(err, terr)
		}
	}()
	step("script: %s on %s", pc.Bake.Script, srv.Instance.ID)
	// The script talks to the terminal on stderr: stdout is the image id.
	if err := srv.RunAsRoot(ctx, "bash -s", bytes.NewReader(script), g.stderr, g.stderr); err != nil {
		var xe *staging.ExitError
		if errors.As(err, &xe) {
			step("script: failed with status %d; no image made", xe.Status)
			return &statusError{code: xe.Status, err: fmt.Errorf("the bake script exited with status %d", xe.Status)}
		}
		return fmt.Errorf("running the bake script: %w", err)
	}
	step("stop: %s", srv.Instance.ID)
	if err := m.StopServer(ctx, srv); err != nil {
		return err
	}
	step("snapshot and register: image %s", name)
	img, err := m.Storage().CreateImage(ctx, srv.Instance.ID, cloud.ImageSpec{
		Name:        name,
		Description: "baked for pool " + poolName + " by hangar image bake",
		Tags:        map[string]string{pool.TagBake: poolName},
		ClientToken: name,
	})
	if err != nil {
		return fmt.Errorf("creating image %s: %w", name, err)
	}
	if img, err = m.WaitImage(ctx, img.ID); err != nil {
		return err
	}
	// Gone before the server hears of the image: a staging manager there
	// (copying it to another region) must not borrow a server on its way out.
	terminated = true
	if err := m.TerminateServer(ctx, srv); err != nil {
		return err
	}
	step("image %s (%s) baked for pool %s", img.Name, img.ID, poolName)
	deleted, perr := pruneImages(ctx, m, poolName, pc.Bake.Keep, img.ID)
	for _, id := range deleted {
		step("prune: deleted image %s", id)
	}
	if perr != nil {
		_, _ = fmt.Fprintln(g.stderr, "hangar: pruning older images: "+oneLine(perr))
	}
	// A running server launches from it at once; one that is not running
	// looks it up when it starts.
	ans, err := g.client().UseImage(ctx, poolName, img.ID, roll)
	var netErr *net.OpError
	switch {
	case errors.As(err, &netErr):
		step("no server answered at %s; it launches from the new image when it starts", g.server)
	case err != nil:
		return fmt.Errorf("image %s is baked, but the server refused it: %w", img.ID, err)
	case roll:
		step("server: pool %s launches from %s; %d idle instances on older images replaced", poolName, img.ID, ans.Rolled)
	default:
		step("server: pool %s launches from %s", poolName, img.ID)
	}
	_, err = fmt.Fprintln(g.stdout, img.ID)
	return err
}

// pruneImages deletes poolName's baked images beyond the newest keep, and
// their snapshots, sparing except and any image an instance runs from.
func pruneImages(ctx context.Context, m *staging.Manager, poolName string, keep int, except string) ([]string, error) {
	imgs, err := pool.BakedImages(ctx, m.Storage(), poolName)
	if err != nil {
		return nil, err
	}
	if len(imgs) <= keep {
		return nil, nil
	}
	running, err := m.Provider().List(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("listing instances to spare the images they run from: %w", err)
	}
	inUse := map[string]bool{except: true}
	for _, in := range running {
		if in.State != cloud.StateTerminated {
			inUse[in.Image] = true
		}
	}
	var deleted []string
	var errs []error
	for _, im := range imgs[keep:] {
		if inUse[im.ID] {
			continue
		}
		if err := m.Storage().DeregisterImage(ctx, im.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		for _, d := range im.Devices {
			if d.SnapshotID != "" {
				if err := m.Storage().DeleteSnapshot(ctx, d.SnapshotID); err != nil {
					errs = append(errs, err)
				}
			}
		}
		deleted = append(deleted, im.ID)
	}
	return deleted, errors.Join(errs...)
}

// listImages prints the images baked for the config's pools (or one).
func listImages(cmd *cobra.Command, g *globals, path, only string) error {
	cfg, err := loadConfig(path)
	if err != nil {
		return err
	}
	type row struct {
		Pool string `json:"pool"`
		cloud.Image
	}
	var rows []row
	for _, name := range sortedPools(cfg, only) {
		pc := cfg.Pools[name]
		if pc.Bake == nil {
			continue
		}
		err := withPoolStaging(cmd, g, path, name, func(ctx context.Context, m *staging.Manager, _ configs.Pool) error {
			imgs, err := pool.BakedImages(ctx, m.Storage(), name)
			for _, im := range imgs {
				rows = append(rows, row{name, im})
			}
			return err
		})
		if err != nil {
			return err
		}
	}
	if only != "" && len(sortedPools(cfg, only)) == 0 {
		return fmt.Errorf("no pool %q in the config", only)
	}
	if g.json() {
		if rows == nil {
			rows = []row{}
		}
		return g.printJSON(rows)
	}
	var table [][]string
	for _, r := range rows {
		table = append(table, []string{r.Pool, r.ID, r.Name, r.State, r.CreatedAt.Local().Format(time.DateTime), strconv.Itoa(len(r.Devices))})
	}
	return g.table("POOL\tIMAGE\tNAME\tSTATE\tCREATED\tDISKS", table)
}

// sortedPools names the config's pools, or only the one asked for.
func sortedPools(cfg configs.Config, only string) []string {
	var names []string
	for name := range cfg.Pools {
		if only == "" || name == only {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}
