package pool

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// Baked images (`hangar image bake`, cmd/hangar/image.go). A pool with a
// bake spec launches from the newest available image tagged
// hangar:bake=POOL, else from its own image. The newest is looked up at
// start, before anything is launched, and again every bakedImageTTL;
// `hangar image bake` tells a running server at once (UseImage).

// TagBake names the pool an image was baked for.
const TagBake = "hangar:bake"

// bakedImageTTL is how long a pool's newest baked image is used before it
// is looked up again.
const bakedImageTTL = 10 * time.Minute

// BakeSpec is a pool's baking: how many baked images to keep. The script
// is the CLI's business.
type BakeSpec struct {
	Keep int
}

// BakedImages lists the images baked for pool on prov, newest first;
// failed ones are left out.
func BakedImages(ctx context.Context, st cloud.Storage, pool string) ([]cloud.Image, error) {
	imgs, err := st.Images(ctx, cloud.Filter{Tags: map[string]string{TagBake: pool}})
	if err != nil {
		return nil, fmt.Errorf("listing the images baked for pool %s: %w", pool, err)
	}
	imgs = slices.DeleteFunc(imgs, func(im cloud.Image) bool { return im.State == cloud.ImageFailed })
	slices.SortFunc(imgs, func(a, b cloud.Image) int {
		return cmp.Or(b.CreatedAt.Compare(a.CreatedAt), cmp.Compare(b.Name, a.Name))
	})
	return imgs, nil
}

// resolveBakedImages looks up the newest baked image of every pool that
// bakes and whose lookup is older than bakedImageTTL (all of them with
// force).
func (m *Manager) resolveBakedImages(ctx context.Context, force bool) {
	now := m.clock.Now()
	m.mu.Lock()
	var due []*poolState
	for _, p := range m.pools {
		if p.spec.Bake != nil && (force || now.Sub(p.bakedAt) >= bakedImageTTL) {
			due = append(due, p)
		}
	}
	m.unlock()
	for _, p := range due {
		st, ok := cloud.StorageOf(p.provider)
		if !ok {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		imgs, err := BakedImages(cctx, st, p.name)
		cancel()
		if err != nil {
			m.log.Warn("looking up the pool's baked image; keeping the one in use", "pool", p.name, "err", err)
			continue
		}
		newest := ""
		for _, im := range imgs {
			if im.State == cloud.ImageAvailable {
				newest = im.ID
				break
			}
		}
		m.mu.Lock()
		if newest != p.bakedImage {
			m.log.Info("pool launches from its newest baked image", "pool", p.name, "image", cmp.Or(newest, p.spec.Launch.Image+" (no baked image)"))
		}
		p.bakedImage, p.bakedAt = newest, now
		m.unlock()
	}
}

// launchImage is the image p's launches use. Caller holds m.mu.
func (p *poolState) launchImage() string {
	return cmp.Or(p.bakedImage, p.spec.Launch.Image)
}

// UseImage makes pool launch from image, one of its baked images, from now
// on: `hangar image bake` calls it so that a running server need not wait
// for its next lookup. With roll, idle instances launched from another
// image are ended at once (min_idle launches their replacements); without,
// they go as they are reaped. It returns how many were ended.
func (m *Manager) UseImage(ctx context.Context, pool, image string, roll bool) (int, error) {
	m.mu.Lock()
	p := m.pools[pool]
	m.unlock()
	switch {
	case p == nil:
		return 0, fmt.Errorf("%w %q", ErrUnknownPool, pool)
	case p.spec.Bake == nil:
		return 0, fmt.Errorf("%w: pool %s has no [bake]", ErrInvalid, pool)
	}
	st, ok := cloud.StorageOf(p.provider)
	if !ok {
		return 0, fmt.Errorf("%w: pool %s's provider has no images", ErrInvalid, pool)
	}
	imgs, err := st.Images(ctx, cloud.Filter{IDs: []string{image}})
	if err != nil {
		return 0, fmt.Errorf("looking up image %s: %w", image, err)
	}
	if len(imgs) != 1 || imgs[0].Tags[TagBake] != pool || imgs[0].State != cloud.ImageAvailable {
		return 0, fmt.Errorf("%w: %s is not an available image baked for pool %s", ErrInvalid, image, pool)
	}
	m.mu.Lock()
	defer m.unlock()
	p.bakedImage, p.bakedAt = image, m.clock.Now()
	m.log.Info("pool launches from a new baked image", "pool", pool, "image", image, "roll", roll)
	rolled := 0
	if roll {
		for _, in := range m.instances {
			if in.Pool == pool && in.State == Idle && in.refresh == nil && in.Image != image {
				m.terminateLocked(in, ReasonImageRolled)
				rolled++
			}
		}
		m.dispatchLocked()
	}
	return rolled, nil
}
