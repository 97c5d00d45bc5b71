package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2"
	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/hangar-ci/hangar/pool/store"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// serveOptions are what tests change about a server.
type serveOptions struct {
	Logger *slog.Logger
	Clock  pool.Clock
	Tick   time.Duration
	// Providers replace the config's providers of the same name, for
	// benchmarks that need a provider built with other options.
	Providers map[string]cloud.Provider
	// ReadHeaderTimeout and ReadTimeout replace the HTTP server's (0: the
	// defaults below), for tests that would not wait that long.
	ReadHeaderTimeout, ReadTimeout time.Duration
}

// The HTTP server's limits. Requests are small and quick to send, but
// answers to long polls take up to pool.MaxWait (leases, a run's output) or
// bootstrap.MaxWait (assignments): the write timeout leaves them a minute
// more. The output upload of a run lasts as long as its command; its
// handler lifts both deadlines for itself.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = time.Minute
	writeTimeout      = max(pool.MaxWait, bootstrap.MaxWait) + time.Minute
	maxHeaderBytes    = 64 << 10
)

// server is one running `hangar serve`.
type server struct {
	cfg       configs.Config
	log       *slog.Logger
	store     *store.Store
	providers map[string]cloud.Provider
	images    *serveImages // copies images between regions for pools (imagecopy.go)
	manager   *pool.Manager
	http      *http.Server
	url       string
	stop      context.CancelFunc
	done      chan struct{}
}

// startServer opens the store, starts the providers and the pool manager,
// and serves the API and bootstrap endpoints. A listen address with port 0
// gets a free port, and a public URL derived from it.
func startServer(ctx context.Context, cfg configs.Config, o serveOptions) (_ *server, err error) {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &server{cfg: cfg, log: log, providers: map[string]cloud.Provider{}, done: make(chan struct{})}
	defer func() {
		if err != nil {
			if cerr := s.closeParts(context.WithoutCancel(ctx)); cerr != nil {
				log.Warn("closing after a failed start", "err", cerr)
			}
		}
	}()

	// Whatever was not checked when the config was loaded (a token's
	// secret, the TLS files), with the messages `hangar config check` gives.
	if err := cfg.ValidateServing(); err != nil {
		return nil, err
	}
	if len(cfg.Pools) == 0 {
		log.Warn("the config has no pools: the API serves, every lease is refused (unknown pool); add a [pools.NAME] table")
	}
	tokens, err := apiTokens(cfg)
	if err != nil {
		return nil, err
	}
	if len(tokens) == 0 {
		if !loopback(cfg.Server.Listen) {
			return nil, fmt.Errorf("refusing to serve on %s without [[server.tokens]]: only a loopback address may be open", cfg.Server.Listen)
		}
		log.Warn("no API tokens configured: the API is open to anyone who can reach " + cfg.Server.Listen)
	}
	var tlsConfig *tls.Config
	if cfg.Server.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.Server.TLSCert, cfg.Server.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("loading tls_cert and tls_key: %w", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	ln, err := net.Listen("tcp", cfg.Server.Listen)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", cfg.Server.Listen, err)
	}
	scheme := cfg.Server.Scheme()
	s.url = scheme + "://" + ln.Addr().String()
	if cfg.Server.PublicURL == "" || cfg.Server.PublicURL == scheme+"://"+cfg.Server.Listen {
		cfg.Server.PublicURL = s.url
	}
	s.cfg.Server.PublicURL = cfg.Server.PublicURL

	// Absolute, because instances run with their own working directories.
	if cfg.Server.DataDir, err = filepath.Abs(cfg.Server.DataDir); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("resolving data dir: %w", err)
	}
	if err := checkOldDataDir(cfg.Server); err != nil {
		_ = ln.Close()
		return nil, err
	}
	if err := os.MkdirAll(cfg.Server.DataDir, 0o700); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	s.store, err = store.Open(filepath.Join(cfg.Server.DataDir, "hangar.db"))
	if err != nil {
		_ = ln.Close()
		return nil, err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := buildInfo()
	metrics.RegisterBuildInfo(reg, build.Version, build.Commit)
	var mgr *pool.Manager
	met := metrics.New(reg, func() metrics.Snapshot {
		if mgr == nil {
			return metrics.Snapshot{}
		}
		return mgr.Snapshot()
	})
	for name, pc := range cfg.Providers {
		if p, ok := o.Providers[name]; ok {
			s.providers[name] = met.Instrument(name, p)
			continue
		}
		p, err := newProvider(ctx, cfg, name, pc, log, met.ObserveRequests)
		if err != nil {
			_ = ln.Close()
			return nil, err
		}
		s.providers[name] = met.Instrument(name, p)
	}
	po := poolOptions(cfg)
	if err := signedIdentities(cfg, po.Pools, s.providers); err != nil {
		_ = ln.Close()
		return nil, err
	}
	po.Providers, po.Store, po.Logger, po.Metrics, po.Clock, po.Tick = s.providers, s.store, log, met, o.Clock, o.Tick
	s.images = newServeImages(cfg, log, s.providers)
	po.Images = s.images
	mgr, err = pool.New(po)
	if err != nil {
		_ = ln.Close()
		return nil, err
	}
	s.manager = mgr

	mux := http.NewServeMux()
	mux.Handle("/bootstrap/", bootstrap.Handler(mgr, log))
	mux.Handle("/", (&api.Server{Manager: mgr, Log: log, Tokens: tokens, Gatherer: reg, MetricsPublic: cfg.Server.MetricsPublic, Build: build}).Handler())
	// The server runs until Close, which stops it in order, not until ctx
	// (the start's) ends: it keeps ctx's values only.
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.stop = cancel
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: cmp.Or(o.ReadHeaderTimeout, readHeaderTimeout),
		ReadTimeout:       cmp.Or(o.ReadTimeout, readTimeout),
		WriteTimeout:      writeTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		TLSConfig:         tlsConfig,
		// Requests end with the server: a long poll answers at once
		// instead of holding Shutdown up, and nothing runs on after the
		// store is closed.
		BaseContext: func(net.Listener) context.Context { return runCtx },
	}
	go func() {
		defer close(s.done)
		mgr.Run(runCtx)
	}()
	go func() {
		var err error
		if tlsConfig != nil {
			err = s.http.ServeTLS(ln, "", "") // the certificate is in TLSConfig
		} else {
			err = s.http.Serve(ln)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("serving", "err", err)
		}
	}()
	log.Info("hangar serving", "url", s.url, "public_url", cfg.Server.PublicURL, "data_dir", cfg.Server.DataDir, "pools", len(cfg.Pools))
	return s, nil
}

// signedIdentities gives each pool with identity = "signed" what checks its
// instances' identity documents: the certificate file of its config, else
// its provider's own (the local cloud signs with a key of its tree), and
// its provider's region.
func signedIdentities(cfg configs.Config, specs map[string]pool.Spec, providers map[string]cloud.Provider) error {
	for name, spec := range specs {
		if spec.Identity != "signed" {
			continue
		}
		pc := cfg.Pools[name]
		prov := providers[pc.Provider]
		var pem []byte
		if pc.IdentityCertificate != "" {
			b, err := os.ReadFile(pc.IdentityCertificate)
			if err != nil {
				return fmt.Errorf("pool %s: reading identity_certificate: %w", name, err)
			}
			pem = b
		} else if c, ok := cloud.As[interface{ IdentityCertificate() []byte }](prov); ok {
			pem = c.IdentityCertificate()
		}
		v, err := identity.FromPEM(pem)
		if err != nil {
			return fmt.Errorf("pool %s: the certificate that checks instance identity documents: %w", name, err)
		}
		check := &pool.IdentityCheck{Verifier: v, Account: pc.IdentityAccount}
		if r, ok := cloud.As[interface{ Region() string }](prov); ok {
			check.Region = r.Region()
		}
		spec.SignedIdentity = check
		specs[name] = spec
	}
	return nil
}

func newProvider(ctx context.Context, cfg configs.Config, name string, pc configs.Provider, log *slog.Logger, observe func(provider string) func(action, code string, d time.Duration)) (cloud.Provider, error) {
	switch pc.Type {
	case "local":
		p, err := local.New(ctx, local.Options{
			Dir:       filepath.Join(cfg.Server.DataDir, "local"),
			Region:    pc.Region,
			BootDelay: pc.BootDelay.Duration,
			Logger:    log.With("provider", name),
		})
		if err != nil {
			return nil, fmt.Errorf("starting provider %s: %w", name, err)
		}
		return p, nil
	case "ec2":
		p, err := ec2.New(ctx, ec2.Options{
			Region:        pc.Region,
			Endpoint:      pc.Endpoint,
			Profile:       pc.Profile,
			CapacityRetry: pc.CapacityRetry.Duration,
			SSHPort:       pc.SSHPort,
			Logger:        log.With("provider", name),
			Observe:       observe(name),
		})
		if err != nil {
			return nil, fmt.Errorf("starting provider %s: %w", name, err)
		}
		return p, nil
	default:
		return nil, fmt.Errorf("provider %s: unknown type %q", name, pc.Type)
	}
}

func apiTokens(cfg configs.Config) ([]api.Token, error) {
	var out []api.Token
	var problems []error
	for _, t := range cfg.Server.Tokens {
		secret, err := t.Secret()
		if err != nil {
			problems = append(problems, err)
			continue
		}
		out = append(out, api.Token{Name: t.Name, Role: t.Role, Secret: secret})
	}
	return out, errors.Join(problems...)
}

func loopback(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Close stops serving and working. Instances keep running: the next start
// adopts them.
func (s *server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.stop()
	if err := s.http.Shutdown(ctx); err != nil {
		s.log.Warn("http shutdown", "err", err)
	}
	<-s.done
	return s.closeParts(context.Background())
}

// closeParts closes what startServer opened; ctx bounds the staging
// servers' ends (image copies).
func (s *server) closeParts(ctx context.Context) error {
	var errs []error
	if s.manager != nil {
		errs = append(errs, s.manager.Close())
	}
	if s.images != nil {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		errs = append(errs, s.images.Close(ctx))
		cancel()
	}
	for _, p := range s.providers {
		errs = append(errs, p.Close())
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	return errors.Join(errs...)
}

// checkOldDataDir refuses to start with an empty store where an older
// Hangar, which took a relative data_dir from the working directory, left
// one: starting afresh would leave that store's instances running, owned
// by nobody, and its leases lost.
func checkOldDataDir(s configs.Server) error {
	if s.OldDataDir == "" {
		return nil
	}
	exists := func(dir string) bool {
		_, err := os.Stat(filepath.Join(dir, "hangar.db"))
		return err == nil
	}
	if exists(s.OldDataDir) && !exists(s.DataDir) {
		return fmt.Errorf("data_dir is relative to the config file now, so it is %s, but the store is in %s (relative to the working directory, as it used to be): move that directory to %s, or give data_dir as an absolute path", s.DataDir, s.OldDataDir, s.DataDir)
	}
	return nil
}
