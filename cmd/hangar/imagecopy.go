package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/user"
	"path"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/staging"
	"github.com/hangar-ci/hangar/configs"
)

// serveImages is the server's pool.ImageCopier: it opens the config's
// providers in other regions and copies images with the staging engine
// (the cloud's CopyImage where it has one, staging servers otherwise).
type serveImages struct {
	cfg       configs.Config
	log       *slog.Logger
	providers map[string]cloud.Provider // the server's, by name

	mu       sync.Mutex // one copy at a time: a staging manager is not for concurrent use
	opened   map[[2]string]cloud.Provider
	names    map[cloud.Provider]string
	managers map[cloud.Provider]*staging.Manager
}

func newServeImages(cfg configs.Config, log *slog.Logger, providers map[string]cloud.Provider) *serveImages {
	s := &serveImages{cfg: cfg, log: log, providers: providers,
		opened: map[[2]string]cloud.Provider{}, names: map[cloud.Provider]string{}, managers: map[cloud.Provider]*staging.Manager{}}
	for name, p := range providers {
		s.names[p] = name
	}
	return s
}

// Region opens provider in region (the server's own when it is its region).
func (s *serveImages) Region(ctx context.Context, provider, region string) (cloud.Provider, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pc, ok := s.cfg.Providers[provider]
	if !ok {
		return nil, fmt.Errorf("no provider %q", provider)
	}
	if p := s.providers[provider]; p != nil {
		if st, ok := cloud.StorageOf(p); ok && st.Region() == region {
			return p, nil
		}
	}
	key := [2]string{provider, region}
	if p := s.opened[key]; p != nil {
		return p, nil
	}
	pc.Region = region
	p, err := newProvider(ctx, s.cfg, provider, pc, s.log, func(string) func(string, string, time.Duration) { return nil })
	if err != nil {
		return nil, fmt.Errorf("opening provider %s in region %s: %w", provider, region, err)
	}
	s.opened[key], s.names[p] = p, provider
	return p, nil
}

// Resolve finds spec in src: an image id, or the newest available image
// whose name matches the pattern.
func (s *serveImages) Resolve(ctx context.Context, src cloud.Provider, spec string) (string, error) {
	st, ok := cloud.StorageOf(src)
	if !ok {
		return "", errors.New("the provider has no images")
	}
	imgs, err := st.Images(ctx, cloud.Filter{})
	if err != nil {
		return "", fmt.Errorf("listing images in %s: %w", st.Region(), err)
	}
	imgs = slices.DeleteFunc(imgs, func(im cloud.Image) bool {
		ok, _ := path.Match(spec, im.Name)
		return im.State != cloud.ImageAvailable || im.ID != spec && !ok
	})
	if len(imgs) == 0 {
		return "", fmt.Errorf("no available image %q in %s: %w", spec, st.Region(), cloud.ErrNotFound)
	}
	newest := slices.MaxFunc(imgs, func(a, b cloud.Image) int { return cmp.Compare(a.CreatedAt.UnixNano(), b.CreatedAt.UnixNano()) })
	return newest.ID, nil
}

// Copy returns the copy of image id of src in dst's region, made earlier
// (found by the tag the staging engine gives copies) or now.
func (s *serveImages) Copy(ctx context.Context, src cloud.Provider, id string, dst cloud.Provider) (cloud.Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	srcSt, ok1 := cloud.StorageOf(src)
	dstSt, ok2 := cloud.StorageOf(dst)
	if !ok1 || !ok2 {
		return cloud.Image{}, errors.New("copying an image needs providers with images")
	}
	if srcSt.Region() == dstSt.Region() {
		imgs, err := srcSt.Images(ctx, cloud.Filter{IDs: []string{id}})
		if err != nil || len(imgs) != 1 {
			return cloud.Image{}, cmp.Or(err, fmt.Errorf("image %s: %w", id, cloud.ErrNotFound))
		}
		return imgs[0], nil
	}
	copies, err := dstSt.Images(ctx, cloud.Filter{Tags: map[string]string{staging.TagCopiedFrom: srcSt.Region() + "/" + id}})
	if err != nil {
		return cloud.Image{}, fmt.Errorf("looking for a copy of %s in %s: %w", id, dstSt.Region(), err)
	}
	for _, c := range copies {
		if c.State == cloud.ImageAvailable {
			return c, nil
		}
	}
	from, err := s.manager(ctx, src)
	if err != nil {
		return cloud.Image{}, err
	}
	to, err := s.manager(ctx, dst)
	if err != nil {
		return cloud.Image{}, err
	}
	// The managers live as long as the server: what they knew of the
	// staging servers (which `hangar staging` and `hangar image bake`
	// share) may be stale.
	if err := errors.Join(from.Scan(ctx), to.Scan(ctx)); err != nil {
		return cloud.Image{}, err
	}
	return from.CopyImage(ctx, id, to)
}

// manager is the staging manager on p, opened once. Its servers are
// terminated when the server closes.
func (s *serveImages) manager(ctx context.Context, p cloud.Provider) (*staging.Manager, error) {
	if m := s.managers[p]; m != nil {
		return m, nil
	}
	name := s.names[p]
	pc := s.cfg.Providers[name]
	me := "root"
	if u, err := user.Current(); err == nil {
		me = u.Username
	}
	st := pc.Staging.StagingDefaults(pc.Type, me)
	m, err := staging.New(ctx, staging.Options{
		Provider: p, ProviderName: name, Dir: filepath.Join(s.cfg.Server.DataDir, "staging"),
		Image: st.Image, InstanceType: st.InstanceType, Zone: st.Zone, User: st.User,
		Sudo:    pc.Type != "local" && st.User != "root",
		Subnets: st.Subnets, SecurityGroups: st.SecurityGroups,
		OnExit: staging.OnExitTerminate, ReadyTimeout: st.ReadyTimeout.Duration,
		Logger: s.log.With("staging", name),
	})
	if err != nil {
		return nil, fmt.Errorf("staging on %s for an image copy: %w", name, err)
	}
	s.managers[p] = m
	return m, nil
}

// Close ends the staging managers (terminating their servers) and the
// providers opened in other regions.
func (s *serveImages) Close(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, m := range s.managers {
		errs = append(errs, m.Close(ctx))
	}
	for _, p := range s.opened {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}
