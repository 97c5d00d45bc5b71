package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/configs"
)

// statusError ends the process with a remote command's exit status; its
// stderr has already reached the terminal.
type statusError struct {
	code int
	err  error
	// say: print err too; otherwise whoever failed has said why already.
	say bool
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

// stagingSession is one `hangar staging` command's managers: the chosen
// provider's region, and any other region a copy opened.
type stagingSession struct {
	g        *globals
	cfg      configs.Config
	name     string
	pc       configs.Provider
	log      *slog.Logger
	managers map[string]*staging.Manager // by region
	clouds   []cloud.Provider
}

func openStaging(ctx context.Context, g *globals, path, provider, region string) (*staging.Manager, *stagingSession, error) {
	cfg, err := loadConfig(path)
	if err != nil {
		return nil, nil, err
	}
	if provider == "" {
		names := slices.Sorted(maps.Keys(cfg.Providers))
		if len(names) != 1 {
			return nil, nil, fmt.Errorf("the config has %d providers (%s); choose one with --provider", len(names), strings.Join(names, ", "))
		}
		provider = names[0]
	}
	pc, ok := cfg.Providers[provider]
	if !ok {
		return nil, nil, fmt.Errorf("no provider %q in the config (defined: %s)", provider, strings.Join(slices.Sorted(maps.Keys(cfg.Providers)), ", "))
	}
	s := &stagingSession{
		g: g, cfg: cfg, name: provider, pc: pc,
		log:      slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		managers: map[string]*staging.Manager{},
	}
	if region == "" {
		region = pc.Region
	}
	m, err := s.manager(ctx, region)
	if err != nil {
		if cerr := s.close(ctx); cerr != nil {
			_, _ = fmt.Fprintln(g.stderr, "hangar: "+oneLine(cerr))
		}
		return nil, nil, err
	}
	return m, s, nil
}

// manager opens the provider in region ("" = as configured) and a staging
// manager on it.
func (s *stagingSession) manager(ctx context.Context, region string) (*staging.Manager, error) {
	if m, ok := s.managers[region]; ok {
		return m, nil
	}
	pc := s.pc
	if region != "" {
		pc.Region = region
	}
	p, err := newProvider(ctx, s.cfg, s.name, pc, s.log, func(string) func(string, string, time.Duration) { return nil })
	if err != nil {
		return nil, err
	}
	s.clouds = append(s.clouds, p)
	me := "root"
	if u, err := user.Current(); err == nil {
		me = u.Username
	}
	st := pc.Staging.StagingDefaults(pc.Type, me)
	m, err := staging.New(ctx, staging.Options{
		Provider:     p,
		ProviderName: s.name,
		Dir:          filepath.Join(s.cfg.Server.DataDir, "staging"),
		Image:        st.Image,
		InstanceType: st.InstanceType,
		Zone:         st.Zone,
		User:         st.User,
		// The local cloud's servers are this machine as this user; an
		// EC2 image's login user needs sudo to mount and to read all files.
		Sudo:           pc.Type != "local" && st.User != "root",
		Subnets:        st.Subnets,
		SecurityGroups: st.SecurityGroups,
		OnExit:         st.OnExit,
		ReadyTimeout:   st.ReadyTimeout.Duration,
		OtherRegion: func(ctx context.Context, region string) (*staging.Manager, error) {
			return s.manager(ctx, region)
		},
		Progress:     s.g.stderr,
		LiveProgress: isTerminal(s.g.stderr),
		Logger:       s.log,
	})
	if err != nil {
		return nil, err
	}
	s.managers[region] = m
	if region != pc.Region {
		s.managers[pc.Region] = m
	}
	return m, nil
}

// close does every manager's on_exit, even when the command was
// interrupted.
func (s *stagingSession) close(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	defer cancel()
	var errs []error
	seen := map[*staging.Manager]bool{}
	for _, m := range s.managers {
		if !seen[m] {
			seen[m] = true
			errs = append(errs, m.Close(ctx))
		}
	}
	for _, p := range s.clouds {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}

// stagingCLI builds `hangar staging`: one constructor per subcommand, all
// working on a provider of the config through with.
type stagingCLI struct {
	g                      *globals
	path, provider, region string
}

func stagingCmd(g *globals) *cobra.Command {
	sc := &stagingCLI{g: g}
	c := &cobra.Command{
		Use:   "staging",
		Short: "Staging servers and volumes: provision, fill with rsync, snapshot, copy between regions",
		Long: `Staging works directly on a provider of the config, with no server running.
Locations: vol:NAME:/path, server:NAME:/path, user@host:/path, or a local path
(a trailing slash copies a directory's contents, as with rsync).`,
	}
	c.PersistentFlags().StringVar(&sc.path, "config", "", "config file (default as for serve)")
	c.PersistentFlags().StringVar(&sc.provider, "provider", "", "provider of the config to use (default: its only one)")
	c.PersistentFlags().StringVar(&sc.region, "region", "", "region of the provider to work in (default: the provider's)")
	put, get, rsync := sc.copyCmds()
	c.AddCommand(sc.serversCmd(), sc.volumesCmd(), sc.snapshotsCmd(), sc.volumeCmd(), put, get, rsync, sc.ddCmd(),
		sc.snapshotCmd(), sc.copySnapshotCmd(), sc.copyImageCmd(), sc.sshCmd(), sc.terminateAllCmd())
	return c
}

// stagingFunc is a subcommand's work, given a manager and its session.
type stagingFunc func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error

// with runs fn with a manager, interrupting it on SIGINT/SIGTERM and
// always doing on_exit afterwards.
func (sc *stagingCLI) with(fn stagingFunc) func(*cobra.Command, []string) error {
	g := sc.g
	return func(cmd *cobra.Command, args []string) error {
		ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		m, s, err := openStaging(ctx, g, sc.path, sc.provider, sc.region)
		if err != nil {
			return err
		}
		err = fn(ctx, m, s, args)
		// on_exit runs even after a Ctrl-C; a second one stops waiting.
		stop()
		cerr := s.close(cmd.Context())
		if err == nil {
			return cerr
		}
		if cerr != nil {
			_, _ = fmt.Fprintln(g.stderr, "hangar: "+oneLine(cerr))
		}
		return err
	}
}

func (sc *stagingCLI) serversCmd() *cobra.Command {
	g, with := sc.g, sc.with
	servers := &cobra.Command{
		Use: "servers", Short: "List staging servers", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			list := m.Servers()
			if g.json() {
				return g.printJSON(list)
			}
			var rows [][]string
			for _, sv := range list {
				in := sv.Instance
				rows = append(rows, []string{sv.Name, in.ID, in.State.String(), in.Zone, in.Type, orDash(firstNonEmpty(in.PublicIP, in.PrivateIP))})
			}
			return g.table("NAME\tID\tSTATE\tZONE\tTYPE\tADDRESS", rows)
		}),
	}
	return servers
}

func (sc *stagingCLI) volumesCmd() *cobra.Command {
	g, with := sc.g, sc.with
	volumes := &cobra.Command{
		Use: "volumes", Short: "List staging volumes", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			list, err := m.Volumes(ctx)
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(list)
			}
			var rows [][]string
			for _, v := range list {
				srv := "-"
				if sv := m.FindServerByInstance(v.Cloud.InstanceID); sv != nil {
					srv = sv.Name
				}
				rows = append(rows, []string{v.Name, v.Cloud.ID, strconv.Itoa(v.Cloud.SizeGB), v.Cloud.Zone, v.Cloud.State, srv, v.FSType, v.Mount})
			}
			return g.table("NAME\tID\tGB\tZONE\tSTATE\tSERVER\tFSTYPE\tMOUNT", rows)
		}),
	}
	return volumes
}

func (sc *stagingCLI) snapshotsCmd() *cobra.Command {
	g, with := sc.g, sc.with
	snapshots := &cobra.Command{
		Use: "snapshots", Short: "List snapshots of staging volumes, newest first", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			list, err := m.Snapshots(ctx)
			if err != nil {
				return err
			}
			if g.json() {
				return g.printJSON(list)
			}
			var rows [][]string
			for _, sn := range list {
				rows = append(rows, []string{sn.ID, sn.Tags[staging.TagName], strconv.Itoa(sn.SizeGB), sn.State,
					sn.StartedAt.UTC().Format(time.RFC3339), orDash(sn.Description)})
			}
			return g.table("ID\tVOLUME\tGB\tSTATE\tSTARTED\tDESCRIPTION", rows)
		}),
	}
	return snapshots
}

func (sc *stagingCLI) volumeCmd() *cobra.Command {
	g, with := sc.g, sc.with
	volume := &cobra.Command{Use: "volume", Short: "Create or delete a staging volume"}
	var spec staging.VolumeSpec
	create := &cobra.Command{
		Use:   "create NAME --size GB",
		Short: "Create a volume (from its name's newest snapshot, unless --no-reuse), attach and mount it on a staging server",
		Args:  cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			spec.Name = args[0]
			v, srv, err := m.ProvisionVolume(ctx, spec)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "volume %s (%s, %d GB, %s) mounted on %s at %s\n", v.Name, v.Cloud.ID, v.Cloud.SizeGB, v.FSType, srv.Name, v.Mount)
			return err
		}),
	}
	f := create.Flags()
	f.IntVar(&spec.SizeGB, "size", 0, "size in GB (default: the snapshot's)")
	f.StringVar(&spec.FSType, "fstype", "", "filesystem: "+strings.Join(staging.FSTypes, ", ")+" (raw: attach only); default the snapshot's, else ext4")
	f.StringVar(&spec.Zone, "zone", "", "availability zone (default: where a staging server is)")
	f.StringVar(&spec.Mount, "mount", "", "mount point on the server (default /mnt/Staging/NAME)")
	f.StringVar(&spec.Label, "label", "", "filesystem label")
	f.StringVar(&spec.SnapshotID, "snapshot", "", "start from this snapshot")
	f.StringVar(&spec.VolumeID, "volume-id", "", "adopt this existing volume instead of creating one")
	f.BoolVar(&spec.NoReuse, "no-reuse", false, "do not start from the newest snapshot of a volume of this name")
	del := &cobra.Command{
		Use: "delete NAME", Short: "Unmount, detach and delete a volume (its snapshots stay)", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			return m.DeleteVolume(ctx, args[0])
		}),
	}
	volume.AddCommand(create, del)
	return volume
}

// copyCmds are put, get and rsync: rsync with checks on where from and to.
func (sc *stagingCLI) copyCmds() (put, get, rsync *cobra.Command) {
	with := sc.with
	var rsyncOpts []string
	copyCmd := func(use, short string, check func(locs []staging.Location) error) *cobra.Command {
		cmd := &cobra.Command{
			Use: use, Short: short, Args: cobra.MinimumNArgs(2),
			RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
				locs, err := staging.ParseLocations(args)
				if err != nil {
					return err
				}
				if err := check(locs); err != nil {
					return err
				}
				return m.Rsync(ctx, rsyncOpts, args...)
			}),
		}
		cmd.Flags().StringArrayVar(&rsyncOpts, "rsync-opt", nil, "extra rsync option, repeatable (e.g. --rsync-opt=--exclude='*.o')")
		return cmd
	}
	put = copyCmd("put LOCAL… vol:NAME:/path", "Copy local files to a volume or server with rsync", func(locs []staging.Location) error {
		for _, l := range locs[:len(locs)-1] {
			if l.Kind != "local" {
				return fmt.Errorf("put copies local paths; %s is not one (use rsync)", l)
			}
		}
		if locs[len(locs)-1].Kind == "local" {
			return errors.New("put needs a remote destination (vol:NAME:/path or server:NAME:/path)")
		}
		return nil
	})
	get = copyCmd("get vol:NAME:/path… LOCAL", "Copy from a volume or server to a local path with rsync", func(locs []staging.Location) error {
		if locs[len(locs)-1].Kind != "local" {
			return fmt.Errorf("get copies to a local path; %s is not one (use rsync)", locs[len(locs)-1])
		}
		if locs[0].Kind == "local" {
			return errors.New("get needs a remote source (vol:NAME:/path or server:NAME:/path)")
		}
		return nil
	})
	rsync = copyCmd("rsync SRC… DEST", "rsync between local paths, volumes, servers and user@host:/path", func([]staging.Location) error { return nil })
	return put, get, rsync
}

func (sc *stagingCLI) snapshotCmd() *cobra.Command {
	g, with := sc.g, sc.with
	var description string
	snapshot := &cobra.Command{
		Use: "snapshot NAME", Short: "Snapshot a volume; a later `volume create NAME` starts from it", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			sn, err := m.Snapshot(ctx, args[0], description)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "%s\n", sn.ID)
			return err
		}),
	}
	snapshot.Flags().StringVar(&description, "description", "", "snapshot description")
	return snapshot
}

func (sc *stagingCLI) copySnapshotCmd() *cobra.Command {
	g, with := sc.g, sc.with
	var to string
	copySnapshot := &cobra.Command{
		Use: "copy-snapshot ID --to REGION", Short: "Copy a snapshot to another region", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			dst, err := m.InRegion(ctx, to)
			if err != nil {
				return err
			}
			sn, err := m.CopySnapshot(ctx, args[0], dst)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "%s\n", sn.ID)
			return err
		}),
	}
	toFlag(copySnapshot, &to)
	return copySnapshot
}

func (sc *stagingCLI) copyImageCmd() *cobra.Command {
	g, with := sc.g, sc.with
	var to string
	copyImage := &cobra.Command{
		Use: "copy-image ID --to REGION", Short: "Copy an image (and its snapshots) to another region", Args: cobra.ExactArgs(1),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			dst, err := m.InRegion(ctx, to)
			if err != nil {
				return err
			}
			img, err := m.CopyImage(ctx, args[0], dst)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "%s\n", img.ID)
			return err
		}),
	}
	toFlag(copyImage, &to)
	return copyImage
}

// toFlag adds the required --to REGION of the copy commands.
func toFlag(cmd *cobra.Command, to *string) {
	cmd.Flags().StringVar(to, "to", "", "destination region")
	if err := cmd.MarkFlagRequired("to"); err != nil {
		panic(err) // the flag is defined just above
	}
}

func (sc *stagingCLI) sshCmd() *cobra.Command {
	g, with := sc.g, sc.with
	sshCmd := &cobra.Command{
		Use: "ssh SERVER [COMMAND [ARG…]]", Short: "Run a command on a staging server, or open a shell on it", Args: cobra.MinimumNArgs(1),
		Long: `Run a command on a staging server, or open a shell on it. As with ssh,
everything after SERVER is the command (its flags are its own), joined with
spaces and run by the server's shell; hangar's own flags go before SERVER.`,
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			srv := m.FindServer(args[0])
			if srv == nil {
				return fmt.Errorf("no staging server %s", args[0])
			}
			c, err := srv.Client(ctx)
			if err != nil {
				return err
			}
			command := strings.Join(args[1:], " ")
			if command != "" && !term.IsTerminal(int(os.Stdin.Fd())) {
				err = c.Run(ctx, command, os.Stdin, g.stdout, g.stderr)
			} else {
				err = interactive(ctx, c, command)
			}
			var xe *staging.ExitError
			if errors.As(err, &xe) {
				return &statusError{code: xe.Status, err: err}
			}
			return err
		}),
	}
	// Flags after SERVER belong to the command: hangar staging ssh srv ls -la.
	sshCmd.Flags().SetInterspersed(false)
	return sshCmd
}

func (sc *stagingCLI) ddCmd() *cobra.Command {
	g, with := sc.g, sc.with
	dd := &cobra.Command{
		Use: "dd SRC-VOLUME DEST-VOLUME", Short: "Copy a whole volume onto another, block for block (both unmounted first)", Args: cobra.ExactArgs(2),
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			n, err := m.DD(ctx, args[0], args[1])
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(g.stdout, "copied %d bytes\n", n)
			return err
		}),
	}
	return dd
}

func (sc *stagingCLI) terminateAllCmd() *cobra.Command {
	g, with := sc.g, sc.with
	terminateAll := &cobra.Command{
		Use: "terminate-all", Short: "Terminate every staging server of the provider (volumes and snapshots stay)", Args: cobra.NoArgs,
		RunE: with(func(ctx context.Context, m *staging.Manager, s *stagingSession, args []string) error {
			n := len(m.Servers())
			if err := m.TerminateAllServers(ctx); err != nil {
				return err
			}
			_, err := fmt.Fprintf(g.stdout, "terminated %d staging servers\n", n)
			return err
		}),
	}
	return terminateAll
}

// interactive runs command (or a login shell) with a PTY, the terminal in
// raw mode and window-size changes forwarded.
func interactive(ctx context.Context, c *staging.Client, command string) error {
	fd := int(os.Stdin.Fd())
	t := staging.Terminal{Term: os.Getenv("TERM"), Width: 80, Height: 24}
	if t.Term == "" {
		t.Term = "xterm"
	}
	if term.IsTerminal(fd) {
		if w, h, err := term.GetSize(fd); err == nil {
			t.Width, t.Height = w, h
		}
		old, err := term.MakeRaw(fd)
		if err != nil {
			return fmt.Errorf("setting the terminal to raw mode: %w", err)
		}
		defer func() { _ = term.Restore(fd, old) }() // nothing more to do if it fails
	}
	resize := make(chan staging.Terminal, 1)
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	defer signal.Stop(winch)
	go func() {
		for range winch {
			if w, h, err := term.GetSize(fd); err == nil {
				nt := t
				nt.Width, nt.Height = w, h
				select {
				case resize <- nt:
				default:
				}
			}
		}
	}()
	return c.Shell(ctx, command, t, os.Stdin, os.Stdout, resize)
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
