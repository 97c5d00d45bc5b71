// Package ec2 is Hangar's provider for Amazon EC2 and EC2-compatible clouds
// (Eucalyptus and its kin, through Options.Endpoint), on aws-sdk-go-v2.
//
// It translates only: it launches, lists, stops, starts and ends instances
// and reports EC2's instance states as cloud.State. What it adds to the
// bare API is what the pool needs to stay out of the known traps:
//
//   - launches are idempotent (EC2's ClientToken, one per offering derived
//     from the launch intent's token), so a retry after a timeout or a
//     crash never starts a second instance, and an earlier attempt is
//     found by its hangar:intent tag (then by client token) on whichever
//     offering it landed; a lookup filter the cloud cannot serve is found
//     out in a second and skipped (filters.go, Notes);
//   - capacity errors fall back through the ordered instance types, subnets
//     or zones and markets, and a failed offering is skipped for a while;
//   - every request waits on a client-side token bucket sized from AWS's
//     throttling table, and throttled requests are retried with jittered
//     backoff, so bursts queue here instead of failing there;
//   - listing is one filtered, paginated DescribeInstances per call.
//
// InvalidInstanceID.NotFound for an instance launched moments ago is EC2's
// eventual consistency, not a vanished instance: see Terminate.
package ec2

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/ec2"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/clock"
)

// Options configures an EC2 provider.
type Options struct {
	// Region is required unless the SDK finds one in the environment or the
	// profile; EC2-compatible clouds need one too, for request signing.
	Region string
	// Endpoint is an EC2-compatible cloud's API URL; "" means AWS.
	Endpoint string
	// Profile names a shared config profile; "" uses the default chain.
	Profile string
	// CapacityRetry is how long an offering (instance type, subnet or zone,
	// market) that failed for lack of capacity is skipped. Default 60s.
	CapacityRetry time.Duration
	// ImageCacheTTL is how long an image name pattern's resolution is
	// reused. Default 10m.
	ImageCacheTTL time.Duration
	// Logger gets the provider's logs; nil discards them.
	Logger *slog.Logger
	// Observe, when set, is called after every request sent to EC2, each
	// retry included, with the action, EC2's error code ("" for success;
	// "Timeout", "Canceled" or "RequestError" when EC2 never answered) and
	// the request's latency, which excludes time spent waiting for the
	// client-side rate limit.
	Observe func(action, code string, d time.Duration)

	// Credentials and HTTPClient are for tests and special setups; nil
	// means the SDK's default credential chain (environment, shared
	// config and profile, web identity, instance role) and HTTP client.
	Credentials aws.CredentialsProvider
	HTTPClient  *http.Client
	// Clock is what backoff waits, rate limits and caches follow; nil:
	// clock.Real.
	Clock clock.Clock
	// RateLimits nil means DefaultRateLimits.
	RateLimits *RateLimits
	// SSHPort is the port the images' sshd listens on, reported in
	// Capabilities; 0 means 22.
	SSHPort int

	// backoff, for tests, replaces the jittered exponential backoff
	// between retries.
	backoff func(attempt int) time.Duration
	// pageSize, for tests, replaces the largest page of the volume and
	// snapshot listings.
	pageSize int32
}

const (
	defaultCapacityRetry = 60 * time.Second
	defaultImageCacheTTL = 10 * time.Minute
	// maxAttempts bounds the SDK's retries of one request. Throttling is
	// the common case; with jittered backoff capped at maxBackoff, eight
	// attempts ride out about a minute of it.
	maxAttempts = 8
	maxBackoff  = 20 * time.Second
)

// ec2API is the part of the EC2 client the provider uses, so that its
// surface stays visible and small.
type ec2API interface {
	ec2.DescribeInstancesAPIClient
	ec2.DescribeImagesAPIClient
	RunInstances(context.Context, *ec2.RunInstancesInput, ...func(*ec2.Options)) (*ec2.RunInstancesOutput, error)
	TerminateInstances(context.Context, *ec2.TerminateInstancesInput, ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error)
	StopInstances(context.Context, *ec2.StopInstancesInput, ...func(*ec2.Options)) (*ec2.StopInstancesOutput, error)
	StartInstances(context.Context, *ec2.StartInstancesInput, ...func(*ec2.Options)) (*ec2.StartInstancesOutput, error)
	GetConsoleOutput(context.Context, *ec2.GetConsoleOutputInput, ...func(*ec2.Options)) (*ec2.GetConsoleOutputOutput, error)
	storageAPI
}

var _ ec2API = (*ec2.Client)(nil)

// Provider is an EC2 region of one account. It is safe for concurrent use.
type Provider struct {
	api       ec2API
	region    string
	sshPort   int
	log       *slog.Logger
	backoff   func(attempt int) time.Duration
	clock     clock.Clock
	images    *imageCache
	offerings *offeringMemory
	limits    *limiter
	recent    *recentLaunches
	// unsure holds the client tokens of launches whose outcome was never
	// learned.
	unsure *recentLaunches
	// tagFilter and tokenFilter are what the provider knows of
	// DescribeInstances' hangar:intent and client-token filters on this
	// cloud (filters.go).
	tagFilter, tokenFilter *filterProbe
	// testPageSize is Options.pageSize.
	testPageSize int32
}

var _ cloud.Provider = (*Provider)(nil)

// New configures an EC2 client. It makes no request: credentials and the
// endpoint are first used by the first call.
func New(ctx context.Context, opts Options) (*Provider, error) {
	if opts.CapacityRetry <= 0 {
		opts.CapacityRetry = defaultCapacityRetry
	}
	if opts.ImageCacheTTL <= 0 {
		opts.ImageCacheTTL = defaultImageCacheTTL
	}
	if opts.SSHPort == 0 {
		opts.SSHPort = 22
	}
	if opts.SSHPort < 1 || opts.SSHPort > 65535 {
		return nil, fmt.Errorf("configuring ec2: ssh port %d is not a TCP port", opts.SSHPort)
	}
	limits := DefaultRateLimits()
	if opts.RateLimits != nil {
		limits = *opts.RateLimits
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	backoff := opts.backoff
	if backoff == nil {
		backoff = jitteredBackoff
	}

	loadOpts := []func(*config.LoadOptions) error{
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = maxAttempts
				o.MaxBackoff = maxBackoff
				// The SDK's retry quota gives up retrying after a run of
				// throttles; the token buckets pace requests instead.
				o.RateLimiter = ratelimit.None
				if opts.backoff != nil {
					o.Backoff = retry.BackoffDelayerFunc(func(attempt int, _ error) (time.Duration, error) {
						return opts.backoff(attempt), nil
					})
				}
				o.Retryables = append([]retry.IsErrorRetryable{retry.IsErrorRetryableFunc(retryable)}, o.Retryables...)
			})
		}),
	}
	if opts.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(opts.Region))
	}
	if opts.Profile != "" {
		loadOpts = append(loadOpts, config.WithSharedConfigProfile(opts.Profile))
	}
	if opts.Credentials != nil {
		loadOpts = append(loadOpts, config.WithCredentialsProvider(opts.Credentials))
	}
	if opts.HTTPClient != nil {
		loadOpts = append(loadOpts, config.WithHTTPClient(opts.HTTPClient))
	}
	cfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("configuring ec2: loading the aws configuration: %w", err)
	}
	if cfg.Region == "" {
		return nil, errors.New("configuring ec2: no region given, and none in the environment or profile")
	}

	clk := opts.Clock
	if clk == nil {
		clk = clock.Real
	}
	now := clk.Now
	lim := newLimiter(limits, clk)
	client := ec2.NewFromConfig(cfg, func(o *ec2.Options) {
		if opts.Endpoint != "" {
			o.BaseEndpoint = aws.String(opts.Endpoint)
		}
		o.APIOptions = append(o.APIOptions, addMiddleware(lim, opts.Observe))
		o.HTTPClient = plainBodies{o.HTTPClient}
	})
	return &Provider{
		api:          client,
		region:       cfg.Region,
		sshPort:      opts.SSHPort,
		testPageSize: opts.pageSize,
		log:          log,
		backoff:      backoff,
		clock:        clk,
		images:       newImageCache(client, opts.ImageCacheTTL, now),
		offerings:    newOfferingMemory(opts.CapacityRetry, now),
		limits:       lim,
		recent:       &recentLaunches{now: now, at: map[string]time.Time{}},
		unsure:       &recentLaunches{now: now, at: map[string]time.Time{}},
		tagFilter:    &filterProbe{name: "tag:" + cloud.TagIntent},
		tokenFilter:  &filterProbe{name: "client-token"},
	}, nil
}

// plainBodies sends request bodies without their WriteTo. The SDK closes
// a request's body as soon as the answer's headers arrive, and its body
// wrapper's WriteTo then fails with io.EOF; if net/http has not yet made
// its last read of the body (which it does through WriteTo), it takes that
// for a failed write and closes the connection under the answer being
// read: "use of closed network connection", a lost answer, a retry. With
// a plain Read, a closed body is a clean end. Large answers (a launch of
// 50) hit it about one time in five against a local server.
type plainBodies struct{ next aws.HTTPClient }

func (c plainBodies) Do(r *http.Request) (*http.Response, error) {
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = struct{ io.ReadCloser }{r.Body}
	}
	return c.next.Do(r)
}

// Capabilities: EC2 stops and starts EBS-backed instances and keeps a
// console log; sshd listens where the images say (Options.SSHPort).
func (p *Provider) Capabilities() cloud.Capabilities {
	return cloud.Capabilities{StopStart: true, ConsoleOutput: true, SSHPort: p.sshPort}
}

// Region is the region the provider's requests are signed for and act in.
func (p *Provider) Region() string { return p.region }

// Close does nothing: the client holds no resources that outlive a call.
func (p *Provider) Close() error { return nil }

// jitteredBackoff waits about 2^attempt seconds, half of it at random, so
// that clients throttled together do not come back together.
func jitteredBackoff(attempt int) time.Duration {
	d := time.Second << min(attempt, 5)
	return d/2 + rand.N(d/2)
}

// consistencyWindow is how long after a launch EC2 may still deny knowing
// an instance (its API is eventually consistent).
const consistencyWindow = 2 * time.Minute

// recentLaunches remembers, within the consistency window, what this
// provider launched or may have launched: instance ids, or the client
// tokens of launches whose answer was lost.
type recentLaunches struct {
	now func() time.Time
	mu  sync.Mutex
	at  map[string]time.Time
}

func (r *recentLaunches) add(ids ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	for id, t := range r.at {
		if now.Sub(t) > consistencyWindow {
			delete(r.at, id)
		}
	}
	for _, id := range ids {
		r.at[id] = now
	}
}

// age returns how long ago id was added, if within the window.
func (r *recentLaunches) age(id string) (time.Duration, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.at[id]
	if !ok {
		return 0, false
	}
	d := r.now().Sub(t)
	return d, d <= consistencyWindow
}
