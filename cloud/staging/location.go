package staging

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"

	"github.com/hangar-ci/hangar/internal/shell"
)

// Location is one side of a copy, as the user wrote it:
//
//	vol:NAME:/path     a path on a staging volume (from its root, wherever it is mounted)
//	vol:NAME           the whole volume (its contents, as "vol:NAME:/")
//	server:NAME:/path  a path on a staging server (NAME or its instance id)
//	user@host:/path    a host the manager does not manage (your own ssh setup)
//	:/path             the same volume, server or host as the source before
//	anything else      a local path; write ./a:b for a local name with a colon
//
// A trailing slash keeps rsync's meaning: "dir/" is the directory's
// contents, "dir" the directory itself.
type Location struct {
	Kind string // "local", "vol", "server", "host"
	Name string // volume or server name, or [user@]host
	Path string
}

func (l Location) String() string {
	switch l.Kind {
	case "local":
		return l.Path
	case "host":
		return l.Name + ":" + l.Path
	}
	return l.Kind + ":" + l.Name + ":" + l.Path
}

// ParseLocations parses sources and a destination; ":/path" repeats the
// kind and name of the location before it.
func ParseLocations(args []string) ([]Location, error) {
	var out []Location
	var errs []error
	for i, a := range args {
		l, err := parseLocation(a)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if l.Kind == "same" {
			if i == 0 || len(out) == 0 || out[len(out)-1].Kind == "local" {
				errs = append(errs, fmt.Errorf("location %q: a leading ':' repeats the volume, server or host before it, and there is none", a))
				continue
			}
			prev := out[len(out)-1]
			l.Kind, l.Name = prev.Kind, prev.Name
		}
		out = append(out, l)
	}
	return out, errors.Join(errs...)
}

func parseLocation(s string) (Location, error) {
	if s == "" {
		return Location{}, errors.New("empty location")
	}
	if strings.ContainsRune(s, 0) {
		return Location{}, fmt.Errorf("location %q contains a NUL byte", s)
	}
	for _, kind := range []string{"vol", "server"} {
		rest, ok := strings.CutPrefix(s, kind+":")
		if !ok {
			continue
		}
		name, p, _ := strings.Cut(rest, ":")
		if err := shell.ValidName(name); err != nil {
			return Location{}, fmt.Errorf("location %q: %s %w", s, kind, err)
		}
		// A volume path starts at the volume's root and stays inside it.
		if kind == "vol" && slices.Contains(strings.Split(p, "/"), "..") {
			return Location{}, fmt.Errorf("location %q: a volume path may not contain \"..\"", s)
		}
		switch {
		case kind == "vol" && p == "":
			p = "/"
		case kind == "vol" && !strings.HasPrefix(p, "/"):
			p = "/" + p // volume paths start at the volume's root
		case p == "":
			return Location{}, fmt.Errorf("location %q: no path on the server", s)
		}
		return Location{Kind: kind, Name: name, Path: p}, nil
	}
	if strings.HasPrefix(s, ":") {
		return Location{Kind: "same", Path: s[1:]}, nil
	}
	// rsync's rule: a colon before any slash makes a remote path.
	if i := strings.IndexByte(s, ':'); i > 0 && !strings.Contains(s[:i], "/") {
		host := s[:i]
		if strings.HasPrefix(host, "-") || strings.ContainsAny(host, " \t\n'\"\\$`;&|<>()") {
			return Location{}, fmt.Errorf("location %q: %q is not a host name", s, host)
		}
		return Location{Kind: "host", Name: host, Path: s[i+1:]}, nil
	}
	return Location{Kind: "local", Path: s}, nil
}

// endpointFor resolves a location to where rsync reaches it: nil for local
// paths, and the path on that machine. Volumes are mounted first.
func (m *Manager) resolve(ctx context.Context, l Location) (*Server, *Endpoint, string, error) {
	switch l.Kind {
	case "local":
		return nil, nil, l.Path, nil
	case "host":
		user, host, ok := strings.Cut(l.Name, "@")
		if !ok {
			user, host = "", l.Name
		}
		return nil, &Endpoint{User: user, Host: host}, l.Path, nil
	case "server":
		srv := m.FindServer(l.Name)
		if srv == nil {
			return nil, nil, "", fmt.Errorf("no staging server %s", l.Name)
		}
		if _, err := srv.Client(ctx); err != nil {
			return nil, nil, "", err
		}
		ep := srv.Endpoint()
		return srv, &ep, srv.Path(l.Path), nil
	case "vol":
		v, err := m.FindVolume(ctx, l.Name)
		if err != nil {
			return nil, nil, "", err
		}
		srv, err := m.Mount(ctx, v)
		if err != nil {
			return nil, nil, "", err
		}
		if v.MountPath == "" {
			return nil, nil, "", fmt.Errorf("volume %s is raw (no filesystem); copy it with dd", v.Name)
		}
		ep := srv.Endpoint()
		// MountPath has no trailing slash and l.Path starts with one, so
		// the user's trailing slash (or its absence) survives.
		return srv, &ep, v.MountPath + l.Path, nil
	}
	return nil, nil, "", fmt.Errorf("location %s: unknown kind %q", l, l.Kind)
}

// Rsync copies sources to dest with rsync, as the Perl manager's rsync():
// between local paths, volumes, servers and plain hosts. All sources must
// be on one machine. Managed servers are reached with the manager's key
// and pinned host keys; between two servers the data goes directly, with
// the key forwarded by agent (it never leaves this machine). extra are
// more rsync options.
func (m *Manager) Rsync(ctx context.Context, extra []string, args ...string) error {
	if len(args) < 2 {
		return errors.New("rsync: need at least one source and a destination")
	}
	locs, err := ParseLocations(args)
	if err != nil {
		return fmt.Errorf("rsync: %w", err)
	}
	srcs, dst := locs[:len(locs)-1], locs[len(locs)-1]
	for _, s := range srcs[1:] {
		if s.Kind != srcs[0].Kind || s.Name != srcs[0].Name {
			return fmt.Errorf("rsync: sources %s and %s are on different machines; copy them one at a time", srcs[0], s)
		}
	}
	if _, err := exec.LookPath("rsync"); err != nil {
		return fmt.Errorf("rsync: the rsync program is needed here: %w", err)
	}

	var srcSrv *Server
	var srcEP *Endpoint
	srcPaths := make([]string, len(srcs))
	for i, s := range srcs {
		srv, ep, p, err := m.resolve(ctx, s)
		if err != nil {
			return fmt.Errorf("rsync: %w", err)
		}
		srcSrv, srcEP, srcPaths[i] = srv, ep, p
	}
	dstSrv, dstEP, dstPath, err := m.resolve(ctx, dst)
	if err != nil {
		return fmt.Errorf("rsync: %w", err)
	}
	opts := RsyncOptions{KeyPath: m.keyPath, KnownHostsPath: m.kh.Path, Extra: extra, Progress: m.opts.Progress, LiveProgress: m.opts.LiveProgress}
	if m.opts.Progress != nil && m.opts.LiveProgress {
		// rsync's progress line ends in a carriage return, not a newline.
		defer func() { _, _ = fmt.Fprintln(m.opts.Progress) }()
	}

	switch {
	case srcEP != nil && dstEP != nil && srcSrv != nil && dstSrv != nil && srcSrv.Instance.ID == dstSrv.Instance.ID:
		// Both ends on one server: rsync runs there, locally.
		c, err := srcSrv.Client(ctx)
		if err != nil {
			return err
		}
		cmd := "rsync -a " + quoteAll(extra) + " -- " + quoteAll(srcPaths) + " " + shell.Quote(dstPath)
		if err := c.Run(ctx, srcSrv.privileged(cmd), nil, m.out, nil); err != nil {
			return fmt.Errorf("rsync on %s: %w", srcSrv.Name, err)
		}
		return nil
	case srcEP != nil && dstEP != nil:
		if srcSrv == nil || dstSrv == nil {
			return errors.New("rsync: between two remote machines, both must be staging servers or volumes; copy through a local directory instead")
		}
		c, err := srcSrv.Client(ctx)
		if err != nil {
			return err
		}
		keys, err := m.kh.pinnedKeys(withPort(dstSrv.Instance.ID))
		if err != nil {
			return fmt.Errorf("rsync: %w", err)
		}
		// Servers of one region reach each other on their private
		// addresses, which security groups for "this machine" may not.
		ep := *dstEP
		if ip := dstSrv.Instance.PrivateIP; ip != "" {
			ep.Host = ip
		}
		return RemoteRsync(ctx, c, m.opts.Sudo, srcPaths, ep, dstPath, keys, m.signer, opts)
	}
	var from []Path
	for _, p := range srcPaths {
		from = append(from, Path{Host: srcEP, Path: p})
	}
	to := Path{Host: dstEP, Path: dstPath}
	// Plain hosts use the person's own ssh setup, not Hangar's key and pins.
	if srcEP != nil && srcSrv == nil || dstEP != nil && dstSrv == nil {
		opts.KeyPath, opts.KnownHostsPath = "", ""
	}
	return Rsync(ctx, opts, from, to)
}

func quoteAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = shell.Quote(s)
	}
	return strings.Join(q, " ")
}
