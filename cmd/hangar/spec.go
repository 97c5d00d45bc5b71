package main

import (
	"cmp"
	"fmt"
	"maps"
	"strings"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/userdata"
)

// poolSpec maps a pool's config, validated, to what the pool manager runs:
// the one place TOML types become the pool's plain ones.
func poolSpec(name string, pc configs.Pool) pool.Spec {
	spec := pool.Spec{
		Provider:       pc.Provider,
		MinIdle:        pc.MinIdle.N,
		MaxInstances:   pc.MaxInstances,
		MaxUses:        pc.MaxUses,
		IdleTTD:        pc.IdleTTD.Duration,
		BootTimeout:    pc.BootTimeout.Duration,
		LeaseTTL:       pc.LeaseTTL.Duration,
		MaxLeaseTTL:    pc.MaxLeaseTTL.Duration,
		ClaimTimeout:   pc.ClaimTimeout.Duration,
		StopWhenIdle:   pc.OnIdle == "stop",
		LaunchBatch:    pc.LaunchBatch,
		Identity:       strings.TrimPrefix(pc.Identity, "none"),
		Bootstrap:      pc.Bootstrap,
		WorkerCommand:  pc.WorkerCommand,
		CleanupCommand: pc.CleanupCommand,
		WorkerUser:     pc.WorkerUser,
		Launch: cloud.LaunchSpec{
			Image:              pc.Image,
			InstanceTypes:      pc.InstanceTypes,
			Zones:              pc.Zones,
			Tags:               maps.Clone(pc.Tags),
			Subnets:            pc.Subnets,
			SecurityGroups:     pc.SecurityGroups,
			KeyName:            pc.KeyName,
			InstanceProfile:    pc.IAMInstanceProfile,
			RootVolumeGB:       pc.RootVolumeGB,
			Spot:               pc.Spot,
			MetadataHTTPTokens: pc.MetadataOptions.HTTPTokens,
			MetadataHopLimit:   pc.MetadataOptions.HopLimit,
		},
		UserData: userdata.Params{
			Env:         maps.Clone(pc.Env),
			Format:      userdata.Format(pc.UserDataFormat),
			CloudConfig: pc.CloudConfig,
		},
	}
	if src, err := configs.ParseImageSource(pc.Image); err == nil && src != (configs.ImageSource{}) {
		// Validated already; the pool launches from a copy in its region.
		spec.ImageFrom = &pool.ImageSource{Pool: src.Pool, Spec: src.Spec, Region: src.Region}
		spec.Launch.Image = ""
	}
	if b := pc.Bake; b != nil {
		spec.Bake = &pool.BakeSpec{Keep: b.Keep}
	}
	if a := pc.Autoscale; a != nil && pc.MinIdle.Auto {
		spec.Autoscale = &pool.AutoscaleSpec{TargetWaitP95: a.TargetWaitP95.Duration, MaxIdle: pc.MaxIdleOf()}
	}
	if c := pc.Cache; c != nil {
		spec.Cache = &pool.CacheSpec{Name: cmp.Or(c.Volume, name), SizeGB: c.SizeGB, Mount: c.Mount, Keep: c.Keep, Refresh: c.Refresh.Duration}
	}
	return spec
}

// poolOptions is the pool manager's options for cfg, but for what only the
// server has (providers, store, logger, metrics, clock).
func poolOptions(cfg configs.Config) pool.Options {
	o := pool.Options{
		Pools:             map[string]pool.Spec{},
		PublicURL:         cfg.Server.PublicURL,
		ReconcileInterval: cfg.Server.ReconcileInterval.Duration,
		OrphanGrace:       cfg.Server.OrphanGrace.Duration,
	}
	for name, pc := range cfg.Pools {
		o.Pools[name] = poolSpec(name, pc)
	}
	return o
}

// renderUserData is what an instance of the pool would boot with.
func renderUserData(cfg configs.Config, name string) ([]byte, error) {
	pc, ok := cfg.Pools[name]
	if !ok {
		return nil, fmt.Errorf("%w %q", pool.ErrUnknownPool, name)
	}
	return pool.RenderUserData(poolSpec(name, pc), name, cfg.Server.PublicURL)
}
