package cloud

import (
	"context"
	"time"
)

// Storage is the optional volume, snapshot, image and key-pair half of a
// provider, used by the staging engine (package cloud/staging). A provider
// that has it implements this interface as well as Provider; callers find it
// with StorageOf, which also sees through wrappers (metrics).
//
// Every call works in the provider's own region. Calls that return a single
// object return it as the cloud answered the call; long operations (a
// snapshot, an image copy) return at once in a pending state and the caller
// polls with the describe calls.
type Storage interface {
	// Region names the provider's region ("local" for the default local
	// cloud, "us-east-1" …).
	Region() string

	// ImportKeyPair makes the public key (OpenSSH authorized_keys format)
	// known to the cloud under name, for LaunchSpec.KeyName. Importing the
	// same key under the same name again succeeds; a different key under a
	// name already taken is an error.
	ImportKeyPair(ctx context.Context, name string, publicKey []byte) error

	CreateVolume(ctx context.Context, spec VolumeSpec) (Volume, error)
	// Volumes lists volumes matching the filter; deleted ones are left out.
	Volumes(ctx context.Context, f Filter) ([]Volume, error)
	// AttachVolume attaches an available volume to a running or stopped
	// instance in its zone as device (a Linux name such as "/dev/sdf").
	AttachVolume(ctx context.Context, volumeID, instanceID, device string) (Volume, error)
	// DetachVolume detaches it; force as EC2's Force (data may be lost).
	DetachVolume(ctx context.Context, volumeID string, force bool) (Volume, error)
	// DeleteVolume deletes an available volume. A volume the cloud does not
	// know counts as deleted.
	DeleteVolume(ctx context.Context, volumeID string) error

	CreateSnapshot(ctx context.Context, volumeID, description string, tags map[string]string) (Snapshot, error)
	Snapshots(ctx context.Context, f Filter) ([]Snapshot, error)
	// DeleteSnapshot deletes it; an unknown id counts as deleted.
	DeleteSnapshot(ctx context.Context, snapshotID string) error
	// CopySnapshot copies a snapshot from sourceRegion into this provider's
	// region, returning the new (usually pending) snapshot.
	CopySnapshot(ctx context.Context, sourceRegion, snapshotID, description string, tags map[string]string) (Snapshot, error)

	Images(ctx context.Context, f Filter) ([]Image, error)
	// CreateImage makes an image of an instance's disks (EC2 CreateImage).
	CreateImage(ctx context.Context, instanceID string, spec ImageSpec) (Image, error)
	// RegisterImage registers an image whose disks are existing snapshots
	// (spec.Devices).
	RegisterImage(ctx context.Context, spec ImageSpec) (Image, error)
	// CopyImage copies an image from sourceRegion into this region with the
	// cloud's own copy call. A cloud without one returns ErrNotSupported and
	// the staging engine copies the image's volumes itself.
	CopyImage(ctx context.Context, sourceRegion, imageID string, spec ImageSpec) (Image, error)
	// DeregisterImage removes the image (not its snapshots). Unknown ids
	// count as removed.
	DeregisterImage(ctx context.Context, imageID string) error

	// Tag adds tags to a volume, snapshot or image, replacing the values
	// of keys it has.
	Tag(ctx context.Context, id string, tags map[string]string) error
}

// Filter selects volumes, snapshots or images: those whose id is in IDs (if
// any are given) and whose tags include all of Tags. Snapshots and images are
// only the account's own.
type Filter struct {
	IDs  []string
	Tags map[string]string
}

// VolumeSpec says what volume to create.
type VolumeSpec struct {
	Zone string
	// SizeGB may be 0 when SnapshotID is set: the snapshot's size.
	SizeGB     int
	SnapshotID string
	// Raw asks for a volume used as a bare block device (the staging
	// engine's fstype "raw"). Clouds whose volumes are directories (the
	// local cloud) give an image file instead; block clouds ignore it.
	Raw  bool
	Tags map[string]string
	// ClientToken makes the creation idempotent where the cloud supports it.
	ClientToken string
}

// Volume states, as EC2 names them.
const (
	VolumeCreating  = "creating"
	VolumeAvailable = "available"
	VolumeInUse     = "in-use"
	VolumeDeleting  = "deleting"
	VolumeError     = "error"
)

// Volume is a disk as the cloud describes it.
type Volume struct {
	ID         string            `json:"id"`
	State      string            `json:"state"`
	SizeGB     int               `json:"size_gb"`
	Zone       string            `json:"zone"`
	SnapshotID string            `json:"snapshot_id,omitempty"`
	Tags       map[string]string `json:"tags,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`

	// Attachment, when attached (or attaching, detaching).
	InstanceID      string `json:"instance_id,omitempty"`
	Device          string `json:"device,omitempty"`
	AttachmentState string `json:"attachment_state,omitempty"` // attaching, attached, detaching
}

// Snapshot states, as EC2 names them.
const (
	SnapshotPending   = "pending"
	SnapshotCompleted = "completed"
	SnapshotError     = "error"
)

// Snapshot is a point-in-time copy of a volume.
type Snapshot struct {
	ID          string            `json:"id"`
	VolumeID    string            `json:"volume_id,omitempty"`
	State       string            `json:"state"`
	Progress    string            `json:"progress,omitempty"` // "100%"
	SizeGB      int               `json:"size_gb"`
	Description string            `json:"description,omitempty"`
	Tags        map[string]string `json:"tags,omitempty"`
	StartedAt   time.Time         `json:"started_at"`
}

// Image states, as EC2 names them.
const (
	ImagePending   = "pending"
	ImageAvailable = "available"
	ImageFailed    = "failed"
)

// Image is a machine image.
type Image struct {
	ID           string            `json:"id"`
	Name         string            `json:"name"`
	Description  string            `json:"description,omitempty"`
	State        string            `json:"state"`
	Architecture string            `json:"architecture,omitempty"`
	RootDevice   string            `json:"root_device,omitempty"`
	Devices      []BlockDevice     `json:"devices,omitempty"`
	Tags         map[string]string `json:"tags,omitempty"`
	CreatedAt    time.Time         `json:"created_at"`
}

// BlockDevice is one disk of an image.
type BlockDevice struct {
	Device     string `json:"device"` // "/dev/xvda"
	SnapshotID string `json:"snapshot_id,omitempty"`
	SizeGB     int    `json:"size_gb,omitempty"`
}

// ImageSpec says what image to create, register or copy to.
type ImageSpec struct {
	Name         string
	Description  string
	Architecture string // RegisterImage only; "" = x86_64
	RootDevice   string // RegisterImage only
	Devices      []BlockDevice
	Tags         map[string]string
	ClientToken  string
}

// Wrapper is a provider that wraps another (to count its calls, say) and
// gives the one it wraps, so that optional interfaces such as Storage stay
// reachable.
type Wrapper interface {
	Unwrap() Provider
}

// StorageOf returns p's Storage, looking through wrappers.
func StorageOf(p Provider) (Storage, bool) { return As[Storage](p) }

// As returns p as the optional interface T (Storage, Noter, a provider's
// own extras), looking through wrappers.
func As[T any](p Provider) (T, bool) {
	for p != nil {
		if t, ok := p.(T); ok {
			return t, true
		}
		w, ok := p.(Wrapper)
		if !ok {
			break
		}
		p = w.Unwrap()
	}
	var zero T
	return zero, false
}
