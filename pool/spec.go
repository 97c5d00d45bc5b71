package pool

import (
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/userdata"
)

// Spec is one pool as the manager runs it: plain values, mapped once from
// the configuration by cmd/hangar, so that the pool never reads TOML types
// (as fleeting's plugins map their config once in Init).
type Spec struct {
	// Provider names the provider the pool launches on (Options.Providers).
	Provider     string
	MinIdle      int
	MaxInstances int
	MaxUses      int // 0: no limit
	IdleTTD      time.Duration
	BootTimeout  time.Duration
	LeaseTTL     time.Duration
	MaxLeaseTTL  time.Duration
	ClaimTimeout time.Duration
	// StopWhenIdle stops instances idle past IdleTTD instead of ending
	// them, where the provider can.
	StopWhenIdle bool
	// LaunchBatch is how many instances one launch call may start (0 reads
	// as 1). Above 1, or with Identity "signed", instances are launched in
	// batches that share one user-data holding a batch enrollment token;
	// each instance enrolls with its instance id for its own bootstrap
	// token (batch.go). 1 launches one instance per call, each with its
	// own token in its user-data.
	LaunchBatch int
	// Identity is "signed" when an enrolling instance must present the
	// cloud's signed identity document, checked by SignedIdentity; "" or
	// "none" otherwise.
	Identity       string
	SignedIdentity *IdentityCheck

	// Bootstrap is where the bootstrap script comes from (bootstrap.Scripts).
	Bootstrap      string
	WorkerCommand  string
	CleanupCommand string
	WorkerUser     string

	// Launch is every launch's template: image, types, zones, network,
	// market, metadata options and the pool's tags. The pool fills in
	// UserData and ClientToken, and adds its own tags.
	Launch cloud.LaunchSpec
	// UserData is the user-data's template: format, env, cloud-config. The
	// pool fills in Pool, HangarURL and BootstrapToken.
	UserData userdata.Params
	// Cache, when set, gives every instance a build cache volume made from
	// the cache's newest snapshot (cache.go). The provider must have
	// cloud.Storage.
	Cache *CacheSpec
	// Bake, when set, makes the pool launch from its newest baked image
	// (bake.go).
	Bake *BakeSpec
	// ImageFrom, when set, is where the pool's image is, in another region
	// (Launch.Image is then empty): the pool launches from its copy.
	ImageFrom *ImageSource
	// Autoscale, when set, makes the pool size its warm spares and their
	// idle TTD itself, from the demand it sees (min_idle = "auto";
	// autoscale.go): MinIdle is then ignored, and IdleTTD only bounds the
	// TTD it computes.
	Autoscale *AutoscaleSpec
}

// IdentityCheck is how a pool with signed identity checks an enrolling
// instance's identity document.
type IdentityCheck struct {
	Verifier *identity.Verifier
	// Region is the provider's: a document of another region is refused.
	Region string
	// Account, when set, is the only account whose documents are taken.
	Account string
}

// AutoscaleSpec is what a pool that sizes its spares itself aims at.
type AutoscaleSpec struct {
	// TargetWaitP95 is the wait for an instance that at most 5% of lease
	// requests may exceed.
	TargetWaitP95 time.Duration
	// MaxIdle caps the spares, whatever the demand.
	MaxIdle int
}

// CacheSpec is a pool's build cache.
type CacheSpec struct {
	// Name tags the cache's volumes and snapshots (hangar:cache).
	Name   string
	SizeGB int
	// Mount is where the bootstrap mounts the volume (under $HANGAR_ROOT
	// on the local cloud).
	Mount string
	// Keep is how many completed snapshots are kept.
	Keep int
	// Refresh, when positive, is how old the newest snapshot may get: the
	// most recently used idle instance's cache is snapshotted this often.
	Refresh time.Duration
}

// userData renders what an instance of pool boots with, carrying token.
func (s Spec) userData(pool, publicURL, token string) ([]byte, error) {
	p := s.UserData
	p.Pool, p.HangarURL, p.BootstrapToken = pool, publicURL, token
	if s.Cache != nil {
		p.Cache = &userdata.Cache{Mount: s.Cache.Mount, Device: cacheDevice}
	}
	return userdata.Render(p)
}

// batched reports whether the pool launches in batches with enrollment
// rather than one instance per call with its token in its user-data.
func (s Spec) batched() bool { return s.LaunchBatch > 1 || s.Identity == "signed" }

// launchBatch is how many instances one launch call may start.
func (s Spec) launchBatch() int { return max(1, s.LaunchBatch) }

// batchUserData renders what every instance of a batch boots with: the
// batch's enrollment token, which only enrolls (channel.go's Enroll).
func (s Spec) batchUserData(pool, publicURL, token string) ([]byte, error) {
	p := s.UserData
	p.Pool, p.HangarURL, p.BootstrapToken = pool, publicURL, token
	if s.Cache != nil {
		p.Cache = &userdata.Cache{Mount: s.Cache.Mount, Device: cacheDevice}
	}
	markEnroll(&p, s.Identity)
	return userdata.Render(p)
}

// markEnroll makes p a batch's user-data, whose token must be exchanged at
// enrollment (with the signed identity document, for identity "signed").
func markEnroll(p *userdata.Params, identity string) {
	p.Enroll = true
	if identity == "signed" {
		p.Identity = userdata.IdentitySigned
	}
}

// RenderUserData renders what an instance of the pool would boot with, with
// a placeholder token, for `hangar userdata render`: a batch's user-data
// when the pool launches batches.
func RenderUserData(s Spec, pool, publicURL string) ([]byte, error) {
	if s.batched() {
		return s.batchUserData(pool, publicURL, "TOKEN-PLACEHOLDER")
	}
	return s.userData(pool, publicURL, "TOKEN-PLACEHOLDER")
}
