// Package cloud is the contract between Hangar's pool manager and the clouds
// it runs instances on.
//
// A Provider only translates: it starts, lists, stops and ends instances and
// reports each one's cloud status as a State. Every decision about what an
// instance is for (booting, idle, leased, draining …) belongs to package pool.
//
// Calls that act on several instances report partial success: they return
// what succeeded together with an error describing what did not, so the
// caller can record the successes before it retries the rest.
package cloud

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// State is an instance's status as the cloud reports it.
type State int

const (
	// StateUnknown: the cloud reported a status the provider does not know.
	// The pool treats it like pending and asks again next cycle.
	StateUnknown State = iota
	// StatePending: accepted by the cloud, not yet running (EC2 "pending").
	StatePending
	// StateRunning: the machine runs; its user-data may still be booting.
	StateRunning
	// StateStopping: a stop was asked for and is under way.
	StateStopping
	// StateStopped: stopped with its disk kept; Start boots it again.
	StateStopped
	// StateTerminating: being ended (EC2 "shutting-down").
	StateTerminating
	// StateTerminated: gone; its id may still be listed for a while.
	StateTerminated
)

var stateNames = [...]string{"unknown", "pending", "running", "stopping", "stopped", "terminating", "terminated"}

func (s State) String() string {
	if s < 0 || int(s) >= len(stateNames) {
		return fmt.Sprintf("State(%d)", int(s))
	}
	return stateNames[s]
}

// ParseState is the inverse of State.String.
func ParseState(s string) (State, error) {
	for i, n := range stateNames {
		if n == s {
			return State(i), nil
		}
	}
	return StateUnknown, fmt.Errorf("unknown instance state %q", s)
}

// MarshalText makes State readable in JSON and on disk.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText parses what MarshalText wrote.
func (s *State) UnmarshalText(b []byte) error {
	v, err := ParseState(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// Tags every Hangar instance carries, so that a restarted server can find and
// adopt what it launched (see docs/design.md).
const (
	TagPool   = "hangar:pool"
	TagOwner  = "hangar:owner"
	TagIntent = "hangar:intent"
)

// Instance is one machine as the cloud describes it.
type Instance struct {
	ID        string `json:"id"`
	State     State  `json:"state"`
	PrivateIP string `json:"private_ip,omitempty"`
	// PublicIP is the address reachable from outside the cloud's network,
	// when the instance has one.
	PublicIP   string            `json:"public_ip,omitempty"`
	Type       string            `json:"type,omitempty"`
	Zone       string            `json:"zone,omitempty"`
	Image      string            `json:"image,omitempty"`
	Tags       map[string]string `json:"tags,omitempty"`
	LaunchedAt time.Time         `json:"launched_at"`
	// LaunchIndex is the instance's place in the launch that started it
	// (0..n-1 for a launch of n; EC2's amiLaunchIndex). A batch of
	// instances started by one call shares one user-data, and the pool
	// tells them apart by it.
	LaunchIndex int `json:"launch_index"`
}

// Noter is implemented by providers that have something an operator
// should see next to their pools, such as a filter the cloud refused and
// the fallback in use. `hangar pools` prints each note.
type Noter interface {
	Notes() []string
}

// LaunchSpec says what to launch.
type LaunchSpec struct {
	Image string
	// InstanceTypes and Zones are in order of preference; a provider that
	// meets a capacity error on one tries the next.
	InstanceTypes []string
	Zones         []string
	UserData      []byte
	Tags          map[string]string
	// ClientToken makes the launch idempotent: a second Launch with the same
	// token returns the instances of the first instead of starting more
	// (EC2's ClientToken). Required.
	ClientToken string

	// What follows is for clouds with networks, markets and metadata
	// services (EC2 and its kin); the local cloud ignores it.

	// Subnets, in order of preference; each names its zone. When set they
	// take the place of Zones.
	Subnets            []string
	SecurityGroups     []string
	KeyName            string
	InstanceProfile    string // IAM instance profile name or ARN
	RootVolumeGB       int    // 0: the image's default
	Spot               string // "off" (or ""), "prefer" (fall back to on-demand), "only"
	MetadataHTTPTokens string // "required" (IMDSv2 only) or "optional"; "" = required
	MetadataHopLimit   int    // 0 = 1
}

// Capabilities says which optional calls a provider supports. A call that is
// not supported returns an error that matches ErrNotSupported.
type Capabilities struct {
	StopStart     bool
	ConsoleOutput bool
	// SSHPort is the port the instances' sshd listens on; 0 means 22.
	SSHPort int
}

// Provider is a cloud Hangar launches instances on.
type Provider interface {
	// Capabilities reports the optional features this provider has.
	Capabilities() Capabilities

	// Launch starts n instances from spec and returns those it started. On
	// partial success it returns the started ones and an error for the rest.
	Launch(ctx context.Context, spec LaunchSpec, n int) ([]Instance, error)

	// List returns every instance, in any state but long-gone ones, whose
	// tags include all of the given tags. One call, however many instances.
	List(ctx context.Context, tags map[string]string) ([]Instance, error)

	// Terminate ends the instances and returns the ids it ended. An id the
	// cloud does not know counts as ended: terminating is idempotent.
	Terminate(ctx context.Context, ids []string) (succeeded []string, err error)

	// Stop stops the instances, keeping their disks (Capabilities.StopStart).
	Stop(ctx context.Context, ids []string) (succeeded []string, err error)

	// Start boots stopped instances again (Capabilities.StopStart).
	Start(ctx context.Context, ids []string) (succeeded []string, err error)

	// ConsoleOutput returns what the instance printed to its console
	// (Capabilities.ConsoleOutput).
	ConsoleOutput(ctx context.Context, id string) ([]byte, error)

	// Close releases the provider's resources. Instances keep running.
	Close() error
}

// Error classes. Providers wrap their errors so that errors.Is matches one of
// these; the pool decides by class (fall back, back off, stop launching).
var (
	// ErrCapacity: the cloud has no capacity for this type, zone or market
	// right now. Try another offering.
	ErrCapacity = errors.New("insufficient capacity")
	// ErrQuota: an account limit was reached. Retrying will not help.
	ErrQuota = errors.New("quota exceeded")
	// ErrThrottled: the cloud asked us to slow down.
	ErrThrottled = errors.New("request throttled")
	// ErrNotFound: the instance (or image …) does not exist.
	ErrNotFound = errors.New("not found")
	// ErrNotSupported: this provider lacks the capability.
	ErrNotSupported = errors.New("not supported by this provider")
)

// ErrorClass names the class of err for metrics labels: "capacity", "quota",
// "throttled", "not_found", "not_supported", "error", or "ok" for nil.
func ErrorClass(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, ErrCapacity):
		return "capacity"
	case errors.Is(err, ErrQuota):
		return "quota"
	case errors.Is(err, ErrThrottled):
		return "throttled"
	case errors.Is(err, ErrNotFound):
		return "not_found"
	case errors.Is(err, ErrNotSupported):
		return "not_supported"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "canceled"
	default:
		return "error"
	}
}

// MatchesTags reports whether have includes every key and value of want.
func MatchesTags(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}
