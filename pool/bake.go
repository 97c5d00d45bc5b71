package pool

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
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
		if p.spec.Bake != nil && p.spec.ImageFrom == nil && (force || now.Sub(p.bakedAt) >= bakedImageTTL) {
			due = append(due, p)
		}
	}
	m.unlock()
	defer func() {
		// Then the copies of the images found, where pools need them.
		m.mu.Lock()
		m.copyImagesLocked(m.clock.Now())
		m.unlock()
	}()
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
		return 0, m.unknownPool(pool)
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
	m.copyImagesLocked(m.clock.Now()) // to the pools that use it elsewhere
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

// Images in another region (image = "bake:POOL" or "SPEC@REGION"): the
// pool launches from a copy in its own region, made through Options.Images
// (the staging engine, wired by cmd/hangar) the first time it is needed
// and again for each newer source; until there is one its leases wait
// (within their wait) and nothing is launched. A failed copy is the pool's
// launch error and is retried with backoff.

// ImageSource is where a pool's image comes from when it is not in the
// pool's region.
type ImageSource struct {
	Pool   string // bake:POOL: that pool's newest baked image
	Spec   string // SPEC@REGION: an image id or name pattern …
	Region string // … in this region of the pool's provider
}

// ImageCopier finds images in other regions and copies them.
type ImageCopier interface {
	// Region opens the named provider's cloud in another region.
	Region(ctx context.Context, provider, region string) (cloud.Provider, error)
	// Resolve names the image spec (an id or a name pattern) stands for in
	// src: the newest available match.
	Resolve(ctx context.Context, src cloud.Provider, spec string) (string, error)
	// Copy returns the copy of image id of src in dst's region, making it
	// if there is none yet (it waits until the copy is available).
	Copy(ctx context.Context, src cloud.Provider, id string, dst cloud.Provider) (cloud.Image, error)
}

// copyImagesLocked starts the copies pools with an image elsewhere need:
// when they have none, or their source has a newer image. Caller holds
// m.mu; the lookups and copies run in the background.
func (m *Manager) copyImagesLocked(now time.Time) {
	for _, p := range m.pools {
		src := p.spec.ImageFrom
		if src == nil || p.copying || now.Before(p.copyRetryAt) {
			continue
		}
		if src.Pool != "" {
			from := m.pools[src.Pool]
			if from == nil || from.bakedImage == "" {
				p.copyStatus = "waiting for pool " + src.Pool + " to have a baked image"
				continue
			}
			if from.bakedImage == p.imageSrc {
				continue
			}
			m.startCopyLocked(p, from.provider, from.bakedImage)
			continue
		}
		if p.bakedImage != "" && now.Sub(p.bakedAt) < bakedImageTTL {
			continue
		}
		m.startCopyLocked(p, nil, "")
	}
}

// startCopyLocked copies image id of prov (nil: p's SPEC@REGION, looked
// up first) to p's region in the background.
func (m *Manager) startCopyLocked(p *poolState, prov cloud.Provider, id string) {
	p.copying = true
	started := m.clock.Now()
	src := *p.spec.ImageFrom
	m.goAsync(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, 24*time.Hour)
		defer cancel()
		var err error
		if prov == nil {
			prov, err = m.opts.Images.Region(cctx, p.spec.Provider, src.Region)
			if err == nil {
				id, err = m.opts.Images.Resolve(cctx, prov, src.Spec)
			}
		}
		m.mu.Lock()
		if err == nil && id == p.imageSrc && p.bakedImage != "" {
			// The source has not changed since the last copy.
			p.copying, p.bakedAt = false, m.clock.Now()
			m.unlock()
			return
		}
		if err == nil {
			p.copyStatus = fmt.Sprintf("copying image %s to this pool's region (since %s)", id, started.UTC().Format(time.RFC3339))
			m.log.Info("copying the pool's image to its region", "pool", p.name, "image", id)
		}
		m.unlock()
		var img cloud.Image
		if err == nil {
			img, err = m.opts.Images.Copy(cctx, prov, id, p.provider)
		}
		m.mu.Lock()
		defer m.unlock()
		p.copying = false
		if ctx.Err() != nil {
			return // shutting down: copied again (or found) at the next start
		}
		if err != nil {
			p.copyFailures++
			backoff := time.Second << min(p.copyFailures, 8)
			p.copyRetryAt = m.clock.Now().Add(backoff/2 + rand.N(backoff/2+1))
			p.launchErr = fmt.Sprintf("copying the pool's image: %v", err)
			m.launchErrorEvent(p.name, "", p.launchErr)
			p.copyStatus = "copy failed; retrying"
			m.log.Warn("copying the pool's image failed", "pool", p.name, "image", id, "retry_at", p.copyRetryAt, "err", err)
			return
		}
		m.log.Info("pool launches from its image's copy", "pool", p.name, "source", id, "image", img.ID, "took", m.clock.Now().Sub(started))
		p.bakedImage, p.imageSrc, p.bakedAt = img.ID, id, m.clock.Now()
		p.copyFailures, p.copyStatus = 0, ""
		if strings.HasPrefix(p.launchErr, "copying the pool's image") {
			p.launchErr = ""
		}
		m.dispatchLocked()
	})
}
