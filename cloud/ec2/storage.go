package ec2

import (
	"bytes"
	"cmp"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"golang.org/x/crypto/ssh"

	"github.com/hangar-ci/hangar/cloud"
)

// This file is the cloud.Storage half of the provider: key pairs, EBS
// volumes and snapshots, and images. Like the rest it translates only;
// the staging engine decides what to create, wait for and delete.
//
// Listings use EC2's filters (volume-id, snapshot-id, image-id, tag:K)
// rather than the id parameters: an id parameter naming one unknown id
// fails the whole call, and DescribeVolumes and DescribeSnapshots refuse
// MaxResults next to it, while a filter just matches nothing and pages.

var _ cloud.Storage = (*Provider)(nil)

// storageAPI is the part of the EC2 client the storage calls use.
type storageAPI interface {
	ec2.DescribeKeyPairsAPIClient
	ec2.DescribeVolumesAPIClient
	ec2.DescribeSnapshotsAPIClient
	ImportKeyPair(context.Context, *ec2.ImportKeyPairInput, ...func(*ec2.Options)) (*ec2.ImportKeyPairOutput, error)
	CreateVolume(context.Context, *ec2.CreateVolumeInput, ...func(*ec2.Options)) (*ec2.CreateVolumeOutput, error)
	AttachVolume(context.Context, *ec2.AttachVolumeInput, ...func(*ec2.Options)) (*ec2.AttachVolumeOutput, error)
	DetachVolume(context.Context, *ec2.DetachVolumeInput, ...func(*ec2.Options)) (*ec2.DetachVolumeOutput, error)
	DeleteVolume(context.Context, *ec2.DeleteVolumeInput, ...func(*ec2.Options)) (*ec2.DeleteVolumeOutput, error)
	CreateSnapshot(context.Context, *ec2.CreateSnapshotInput, ...func(*ec2.Options)) (*ec2.CreateSnapshotOutput, error)
	DeleteSnapshot(context.Context, *ec2.DeleteSnapshotInput, ...func(*ec2.Options)) (*ec2.DeleteSnapshotOutput, error)
	CopySnapshot(context.Context, *ec2.CopySnapshotInput, ...func(*ec2.Options)) (*ec2.CopySnapshotOutput, error)
	CreateImage(context.Context, *ec2.CreateImageInput, ...func(*ec2.Options)) (*ec2.CreateImageOutput, error)
	RegisterImage(context.Context, *ec2.RegisterImageInput, ...func(*ec2.Options)) (*ec2.RegisterImageOutput, error)
	CopyImage(context.Context, *ec2.CopyImageInput, ...func(*ec2.Options)) (*ec2.CopyImageOutput, error)
	DeregisterImage(context.Context, *ec2.DeregisterImageInput, ...func(*ec2.Options)) (*ec2.DeregisterImageOutput, error)
	CreateTags(context.Context, *ec2.CreateTagsInput, ...func(*ec2.Options)) (*ec2.CreateTagsOutput, error)
}

const (
	// Largest pages of DescribeVolumes and DescribeSnapshots.
	volumePageSize   = 500
	snapshotPageSize = 1000
	// maxVolumeGB is EBS's largest volume (io2 Block Express, gp3: 64 TiB).
	maxVolumeGB = 64 << 10
	// defaultArchitecture is RegisterImage's when the spec names none.
	defaultArchitecture = "x86_64"
)

// ImportKeyPair imports publicKey under name. EC2 refuses a name already
// taken (InvalidKeyPair.Duplicate) even for the same key, so then the
// stored key is compared: the same key is success, another is an error
// naming the key pair.
func (p *Provider) ImportKeyPair(ctx context.Context, name string, publicKey []byte) error {
	doing := fmt.Sprintf("importing ec2 key pair %q", name)
	if name == "" {
		return errors.New("importing ec2 key pair: no name given")
	}
	key, _, _, _, err := ssh.ParseAuthorizedKey(publicKey)
	if err != nil {
		return fmt.Errorf("%s: the public key is not in OpenSSH authorized_keys format: %w", doing, err)
	}
	// EC2 wants the authorized_keys line; a comment would only be noise.
	material := bytes.TrimSpace(ssh.MarshalAuthorizedKey(key))
	_, err = p.api.ImportKeyPair(ctx, &ec2.ImportKeyPairInput{KeyName: aws.String(name), PublicKeyMaterial: material})
	if err == nil {
		return nil
	}
	if errorCode(err) != "InvalidKeyPair.Duplicate" {
		return wrapErr(doing, err)
	}
	info, err := p.describeKeyPair(ctx, name)
	if err != nil {
		return fmt.Errorf("%s: the name is taken; comparing the keys: %w", doing, err)
	}
	same, err := sameKey(info, key)
	if err != nil {
		return fmt.Errorf("%s: the name is taken: %w", doing, err)
	}
	if !same {
		return fmt.Errorf("%s: a different key is already imported under that name (EC2 fingerprint %s); delete it or choose another name",
			doing, cmp.Or(aws.ToString(info.KeyFingerprint), "not given"))
	}
	return nil
}

// describeKeyPair returns what EC2 holds of the key pair name, its public
// key included where the cloud gives it.
func (p *Provider) describeKeyPair(ctx context.Context, name string) (types.KeyPairInfo, error) {
	in := &ec2.DescribeKeyPairsInput{KeyNames: []string{name}, IncludePublicKey: aws.Bool(true)}
	out, err := p.api.DescribeKeyPairs(ctx, in)
	if err != nil && unknownParameter(err) {
		// IncludePublicKey is from 2021; older compatible clouds refuse it
		// and leave only the fingerprint to compare.
		in.IncludePublicKey = nil
		out, err = p.api.DescribeKeyPairs(ctx, in)
	}
	if err != nil {
		return types.KeyPairInfo{}, wrapErr("describing the key pair", err)
	}
	for _, kp := range out.KeyPairs {
		if aws.ToString(kp.KeyName) == name {
			return kp, nil
		}
	}
	return types.KeyPairInfo{}, fmt.Errorf("describing the key pair: EC2 lists none of that name: %w", cloud.ErrNotFound)
}

// unknownParameter reports whether err is a cloud refusing a parameter it
// does not know.
func unknownParameter(err error) bool {
	switch errorCode(err) {
	case "InvalidParameter", "InvalidParameterValue", "InvalidParameterCombination",
		"UnknownParameter", "UnsupportedOperation", "InvalidAction":
		return true
	}
	return false
}

// sameKey reports whether the key pair EC2 holds has the public key want.
// It compares the keys themselves when EC2 returned the stored one, else
// EC2's fingerprint of an imported key (see importFingerprints).
func sameKey(info types.KeyPairInfo, want ssh.PublicKey) (bool, error) {
	if stored := aws.ToString(info.PublicKey); stored != "" {
		have, _, _, _, err := ssh.ParseAuthorizedKey([]byte(stored))
		if err != nil {
			return false, fmt.Errorf("parsing the public key EC2 holds: %w", err)
		}
		return bytes.Equal(have.Marshal(), want.Marshal()), nil
	}
	fp := strings.TrimSpace(aws.ToString(info.KeyFingerprint))
	if fp == "" {
		return false, errors.New("EC2 returned neither the stored public key nor its fingerprint, so the keys cannot be compared")
	}
	mine, err := importFingerprints(want)
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(mine, func(m string) bool {
		if want.Type() == ssh.KeyAlgoED25519 {
			// ssh-keygen prints the same digest without the padding.
			return strings.TrimRight(fp, "=") == strings.TrimRight(m, "=")
		}
		return strings.EqualFold(fp, m)
	}), nil
}

// importFingerprints are the fingerprints EC2 may show for key once
// imported. For ed25519 it is the base64 SHA-256 of the key, as OpenSSH
// prints it. For RSA, EC2's user guide has the MD5 of the DER public key
// (its openssl commands) while its API reference says RFC 4716's MD5 of
// the SSH key blob, which is also what compatible clouds may use: either
// matching is the same key.
func importFingerprints(key ssh.PublicKey) ([]string, error) {
	switch key.Type() {
	case ssh.KeyAlgoED25519:
		sum := sha256.Sum256(key.Marshal())
		return []string{base64.StdEncoding.EncodeToString(sum[:])}, nil
	case ssh.KeyAlgoRSA:
		ck, ok := key.(ssh.CryptoPublicKey)
		if !ok {
			return nil, fmt.Errorf("cannot fingerprint the %s key", key.Type())
		}
		der, err := x509.MarshalPKIXPublicKey(ck.CryptoPublicKey())
		if err != nil {
			return nil, fmt.Errorf("fingerprinting the %s key: %w", key.Type(), err)
		}
		return []string{colonHex(md5.Sum(der)), ssh.FingerprintLegacyMD5(key)}, nil
	default:
		return nil, fmt.Errorf("EC2 imports only rsa and ed25519 keys, not %s", key.Type())
	}
}

// colonHex writes a digest as EC2 and "openssl md5 -c" do: "ab:cd:…".
func colonHex(sum [md5.Size]byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = hex.EncodeToString([]byte{b})
	}
	return strings.Join(parts, ":")
}

// CreateVolume creates a gp3 volume, from a snapshot if the spec names one.
func (p *Provider) CreateVolume(ctx context.Context, spec cloud.VolumeSpec) (cloud.Volume, error) {
	doing := fmt.Sprintf("creating an ec2 volume in %s", spec.Zone)
	switch {
	case spec.Zone == "":
		return cloud.Volume{}, errors.New("creating an ec2 volume: no zone given")
	case spec.SizeGB < 0 || spec.SizeGB > maxVolumeGB:
		return cloud.Volume{}, fmt.Errorf("%s: size %d GB is not between 1 and %d", doing, spec.SizeGB, maxVolumeGB)
	case spec.SizeGB == 0 && spec.SnapshotID == "":
		return cloud.Volume{}, fmt.Errorf("%s: neither a size nor a snapshot given", doing)
	}
	in := &ec2.CreateVolumeInput{
		AvailabilityZone:  aws.String(spec.Zone),
		VolumeType:        types.VolumeTypeGp3,
		TagSpecifications: tagSpecs(spec.Tags, types.ResourceTypeVolume),
		ClientToken:       ec2Token(spec.ClientToken),
	}
	if spec.SizeGB > 0 {
		in.Size = aws.Int32(int32(spec.SizeGB))
	}
	if spec.SnapshotID != "" {
		in.SnapshotId = aws.String(spec.SnapshotID)
	}
	out, err := p.api.CreateVolume(ctx, in)
	if err != nil {
		return cloud.Volume{}, wrapErr(doing, err)
	}
	return toVolume(types.Volume{
		VolumeId: out.VolumeId, State: out.State, Size: out.Size, AvailabilityZone: out.AvailabilityZone,
		SnapshotId: out.SnapshotId, Tags: out.Tags, CreateTime: out.CreateTime, Attachments: out.Attachments,
	}), nil
}

// Volumes lists the volumes the filter selects, in one paginated call.
func (p *Provider) Volumes(ctx context.Context, f cloud.Filter) ([]cloud.Volume, error) {
	pages := ec2.NewDescribeVolumesPaginator(p.api, &ec2.DescribeVolumesInput{
		Filters:    filters("volume-id", f),
		MaxResults: aws.Int32(p.pageSize(volumePageSize)),
	})
	var out []cloud.Volume
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return nil, wrapErr("listing ec2 volumes", err)
		}
		for _, v := range page.Volumes {
			// A deleted volume lingers in EC2's answers for a while.
			if v.State == types.VolumeStateDeleted {
				continue
			}
			vol := toVolume(v)
			if matches(vol.ID, vol.Tags, f) {
				out = append(out, vol)
			}
		}
	}
	return out, nil
}

// AttachVolume attaches the volume to the instance as device.
func (p *Provider) AttachVolume(ctx context.Context, volumeID, instanceID, device string) (cloud.Volume, error) {
	doing := fmt.Sprintf("attaching ec2 volume %s to %s as %s", volumeID, instanceID, device)
	if volumeID == "" || instanceID == "" || device == "" {
		return cloud.Volume{}, fmt.Errorf("%s: a volume, an instance and a device are all needed", doing)
	}
	out, err := p.api.AttachVolume(ctx, &ec2.AttachVolumeInput{
		VolumeId: aws.String(volumeID), InstanceId: aws.String(instanceID), Device: aws.String(device),
	})
	if err != nil {
		return cloud.Volume{}, wrapErr(doing, err)
	}
	return attachedVolume(volumeID, out.InstanceId, out.Device, out.State), nil
}

// DetachVolume detaches the volume from whatever instance has it.
func (p *Provider) DetachVolume(ctx context.Context, volumeID string, force bool) (cloud.Volume, error) {
	doing := "detaching ec2 volume " + volumeID
	if volumeID == "" {
		return cloud.Volume{}, errors.New("detaching an ec2 volume: no volume id given")
	}
	in := &ec2.DetachVolumeInput{VolumeId: aws.String(volumeID)}
	if force {
		in.Force = aws.Bool(true)
	}
	out, err := p.api.DetachVolume(ctx, in)
	if err != nil {
		return cloud.Volume{}, wrapErr(doing, err)
	}
	return attachedVolume(volumeID, out.InstanceId, out.Device, out.State), nil
}

// attachedVolume is a volume as EC2's attach and detach calls answer: the
// attachment only. The volume stays in use until the detachment is done.
func attachedVolume(volumeID string, instanceID, device *string, state types.VolumeAttachmentState) cloud.Volume {
	return cloud.Volume{
		ID:              volumeID,
		State:           cloud.VolumeInUse,
		InstanceID:      aws.ToString(instanceID),
		Device:          aws.ToString(device),
		AttachmentState: string(state),
	}
}

// DeleteVolume deletes the volume; one EC2 does not know counts as
// deleted.
func (p *Provider) DeleteVolume(ctx context.Context, volumeID string) error {
	if volumeID == "" {
		return errors.New("deleting an ec2 volume: no volume id given")
	}
	_, err := p.api.DeleteVolume(ctx, &ec2.DeleteVolumeInput{VolumeId: aws.String(volumeID)})
	if errorCode(err) == "InvalidVolume.NotFound" {
		return nil
	}
	return wrapErr("deleting ec2 volume "+volumeID, err)
}

// CreateSnapshot starts a snapshot of the volume; it returns pending.
func (p *Provider) CreateSnapshot(ctx context.Context, volumeID, description string, tags map[string]string) (cloud.Snapshot, error) {
	doing := "snapshotting ec2 volume " + volumeID
	if volumeID == "" {
		return cloud.Snapshot{}, errors.New("snapshotting an ec2 volume: no volume id given")
	}
	in := &ec2.CreateSnapshotInput{
		VolumeId:          aws.String(volumeID),
		TagSpecifications: tagSpecs(tags, types.ResourceTypeSnapshot),
	}
	if description != "" {
		in.Description = aws.String(description)
	}
	out, err := p.api.CreateSnapshot(ctx, in)
	if err != nil {
		return cloud.Snapshot{}, wrapErr(doing, err)
	}
	return toSnapshot(types.Snapshot{
		SnapshotId: out.SnapshotId, VolumeId: out.VolumeId, State: out.State, Progress: out.Progress,
		VolumeSize: out.VolumeSize, Description: out.Description, Tags: out.Tags, StartTime: out.StartTime,
	}), nil
}

// Snapshots lists the account's own snapshots the filter selects.
func (p *Provider) Snapshots(ctx context.Context, f cloud.Filter) ([]cloud.Snapshot, error) {
	pages := ec2.NewDescribeSnapshotsPaginator(p.api, &ec2.DescribeSnapshotsInput{
		OwnerIds:   []string{"self"},
		Filters:    filters("snapshot-id", f),
		MaxResults: aws.Int32(p.pageSize(snapshotPageSize)),
	})
	var out []cloud.Snapshot
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return nil, wrapErr("listing ec2 snapshots", err)
		}
		for _, s := range page.Snapshots {
			snap := toSnapshot(s)
			if matches(snap.ID, snap.Tags, f) {
				out = append(out, snap)
			}
		}
	}
	return out, nil
}

// DeleteSnapshot deletes the snapshot; one EC2 does not know counts as
// deleted.
func (p *Provider) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	if snapshotID == "" {
		return errors.New("deleting an ec2 snapshot: no snapshot id given")
	}
	_, err := p.api.DeleteSnapshot(ctx, &ec2.DeleteSnapshotInput{SnapshotId: aws.String(snapshotID)})
	if errorCode(err) == "InvalidSnapshot.NotFound" {
		return nil
	}
	return wrapErr("deleting ec2 snapshot "+snapshotID, err)
}

// CopySnapshot copies a snapshot of sourceRegion into the provider's
// region. The SDK signs the PresignedUrl EC2 needs for the source region
// itself, with the provider's credentials and endpoint.
func (p *Provider) CopySnapshot(ctx context.Context, sourceRegion, snapshotID, description string, tags map[string]string) (cloud.Snapshot, error) {
	doing := fmt.Sprintf("copying ec2 snapshot %s from %s to %s", snapshotID, sourceRegion, p.region)
	if sourceRegion == "" || snapshotID == "" {
		return cloud.Snapshot{}, fmt.Errorf("%s: a source region and a snapshot id are both needed", doing)
	}
	in := &ec2.CopySnapshotInput{
		SourceRegion:      aws.String(sourceRegion),
		SourceSnapshotId:  aws.String(snapshotID),
		TagSpecifications: tagSpecs(tags, types.ResourceTypeSnapshot),
	}
	if description != "" {
		in.Description = aws.String(description)
	}
	out, err := p.api.CopySnapshot(ctx, in)
	if err != nil {
		return cloud.Snapshot{}, wrapErr(doing, err)
	}
	return cloud.Snapshot{
		ID:          aws.ToString(out.SnapshotId),
		State:       cloud.SnapshotPending,
		Description: description,
		Tags:        fromTags(out.Tags, tags),
	}, nil
}

// Images lists the account's own images the filter selects.
func (p *Provider) Images(ctx context.Context, f cloud.Filter) ([]cloud.Image, error) {
	pages := ec2.NewDescribeImagesPaginator(p.api, &ec2.DescribeImagesInput{
		Owners:  []string{"self"},
		Filters: filters("image-id", f),
		// No MaxResults, as in images.go: not every compatible cloud pages
		// images. The paginator still follows a NextToken.
	})
	var out []cloud.Image
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return nil, wrapErr("listing ec2 images", err)
		}
		for _, im := range page.Images {
			// A deregistered image lingers in EC2's answers for a while.
			if im.State == types.ImageStateDeregistered {
				continue
			}
			img := toCloudImage(im)
			if matches(img.ID, img.Tags, f) {
				out = append(out, img)
			}
		}
	}
	return out, nil
}

// CreateImage starts an image of the instance's disks; it returns pending.
// EC2 reboots the instance for a consistent file system. The image's
// snapshots carry the tags too, so that one left behind can be traced.
func (p *Provider) CreateImage(ctx context.Context, instanceID string, spec cloud.ImageSpec) (cloud.Image, error) {
	doing := fmt.Sprintf("creating ec2 image %q of %s", spec.Name, instanceID)
	if instanceID == "" || spec.Name == "" {
		return cloud.Image{}, fmt.Errorf("%s: an instance and a name are both needed", doing)
	}
	in := &ec2.CreateImageInput{
		InstanceId:        aws.String(instanceID),
		Name:              aws.String(spec.Name),
		TagSpecifications: tagSpecs(spec.Tags, types.ResourceTypeImage, types.ResourceTypeSnapshot),
	}
	if spec.Description != "" {
		in.Description = aws.String(spec.Description)
	}
	out, err := p.api.CreateImage(ctx, in)
	if err != nil {
		return cloud.Image{}, wrapErr(doing, err)
	}
	return pendingImage(aws.ToString(out.ImageId), spec), nil
}

// RegisterImage registers an HVM, ENA image whose disks are the spec's
// snapshots, each a gp3 volume deleted with its instance.
func (p *Provider) RegisterImage(ctx context.Context, spec cloud.ImageSpec) (cloud.Image, error) {
	in, err := registerInput(spec)
	if err != nil {
		return cloud.Image{}, err
	}
	out, err := p.api.RegisterImage(ctx, in)
	if err != nil {
		return cloud.Image{}, wrapErr(fmt.Sprintf("registering ec2 image %q", spec.Name), err)
	}
	img := pendingImage(aws.ToString(out.ImageId), spec)
	img.Architecture = string(in.Architecture)
	img.RootDevice = aws.ToString(in.RootDeviceName)
	img.Devices = slices.Clone(spec.Devices)
	return img, nil
}

// registerInput checks spec and builds RegisterImage's input.
func registerInput(spec cloud.ImageSpec) (*ec2.RegisterImageInput, error) {
	doing := fmt.Sprintf("registering ec2 image %q", spec.Name)
	var problems []error
	if spec.Name == "" {
		problems = append(problems, errors.New("no name given"))
	}
	if len(spec.Devices) == 0 {
		problems = append(problems, errors.New("no devices given"))
	}
	in := &ec2.RegisterImageInput{
		Name:               aws.String(spec.Name),
		Architecture:       types.ArchitectureValues(cmp.Or(spec.Architecture, defaultArchitecture)),
		VirtualizationType: aws.String("hvm"),
		EnaSupport:         aws.Bool(true),
		TagSpecifications:  tagSpecs(spec.Tags, types.ResourceTypeImage),
	}
	if spec.Description != "" {
		in.Description = aws.String(spec.Description)
	}
	var names []string
	for i, d := range spec.Devices {
		switch {
		case d.Device == "":
			problems = append(problems, fmt.Errorf("device %d: no device name", i+1))
			continue
		case slices.Contains(names, d.Device):
			problems = append(problems, fmt.Errorf("device %s given twice", d.Device))
		case d.SnapshotID == "":
			problems = append(problems, fmt.Errorf("device %s: no snapshot", d.Device))
		case d.SizeGB < 0 || d.SizeGB > maxVolumeGB:
			problems = append(problems, fmt.Errorf("device %s: size %d GB is not between 1 and %d", d.Device, d.SizeGB, maxVolumeGB))
		}
		names = append(names, d.Device)
		ebs := &types.EbsBlockDevice{
			SnapshotId:          aws.String(d.SnapshotID),
			DeleteOnTermination: aws.Bool(true),
			VolumeType:          types.VolumeTypeGp3,
		}
		if d.SizeGB > 0 {
			ebs.VolumeSize = aws.Int32(int32(d.SizeGB))
		}
		in.BlockDeviceMappings = append(in.BlockDeviceMappings, types.BlockDeviceMapping{DeviceName: aws.String(d.Device), Ebs: ebs})
	}
	root := spec.RootDevice
	if root == "" && len(names) > 0 {
		root = names[0]
	}
	if root != "" && len(names) > 0 && !slices.Contains(names, root) {
		problems = append(problems, fmt.Errorf("root device %s is not one of the devices", root))
	}
	in.RootDeviceName = aws.String(root)
	if err := errors.Join(problems...); err != nil {
		return nil, fmt.Errorf("%s: %w", doing, err)
	}
	return in, nil
}

// CopyImage copies an image of sourceRegion, with its snapshots, into the
// provider's region; it returns pending.
func (p *Provider) CopyImage(ctx context.Context, sourceRegion, imageID string, spec cloud.ImageSpec) (cloud.Image, error) {
	doing := fmt.Sprintf("copying ec2 image %s from %s to %s", imageID, sourceRegion, p.region)
	if sourceRegion == "" || imageID == "" || spec.Name == "" {
		return cloud.Image{}, fmt.Errorf("%s: a source region, an image id and a name are all needed", doing)
	}
	in := &ec2.CopyImageInput{
		SourceRegion:  aws.String(sourceRegion),
		SourceImageId: aws.String(imageID),
		Name:          aws.String(spec.Name),
		ClientToken:   ec2Token(spec.ClientToken),
		// The copied snapshots carry the tags too, as CreateImage's do.
		TagSpecifications: tagSpecs(spec.Tags, types.ResourceTypeImage, types.ResourceTypeSnapshot),
	}
	if spec.Description != "" {
		in.Description = aws.String(spec.Description)
	}
	out, err := p.api.CopyImage(ctx, in)
	if err != nil {
		return cloud.Image{}, wrapErr(doing, err)
	}
	return pendingImage(aws.ToString(out.ImageId), spec), nil
}

// DeregisterImage removes the image, keeping its snapshots; one EC2 does
// not know, or no longer offers, counts as removed.
func (p *Provider) DeregisterImage(ctx context.Context, imageID string) error {
	if imageID == "" {
		return errors.New("deregistering an ec2 image: no image id given")
	}
	_, err := p.api.DeregisterImage(ctx, &ec2.DeregisterImageInput{ImageId: aws.String(imageID)})
	switch errorCode(err) {
	case "InvalidAMIID.NotFound", "InvalidAMIID.Unavailable":
		return nil
	}
	return wrapErr("deregistering ec2 image "+imageID, err)
}

// pendingImage is an image as EC2's create, register and copy calls
// answer: its id alone, the rest from what was asked.
func pendingImage(id string, spec cloud.ImageSpec) cloud.Image {
	return cloud.Image{
		ID:          id,
		Name:        spec.Name,
		Description: spec.Description,
		State:       cloud.ImagePending,
		Tags:        maps.Clone(spec.Tags),
	}
}

// pageSize is size, or the test's smaller page.
func (p *Provider) pageSize(size int32) int32 {
	if p.testPageSize > 0 {
		return p.testPageSize
	}
	return size
}

// filters selects the filter's ids (with EC2's id filter idName) and tags.
func filters(idName string, f cloud.Filter) []types.Filter {
	var out []types.Filter
	if len(f.IDs) > 0 {
		out = append(out, types.Filter{Name: aws.String(idName), Values: slices.Clone(f.IDs)})
	}
	for _, k := range slices.Sorted(maps.Keys(f.Tags)) {
		out = append(out, types.Filter{Name: aws.String("tag:" + k), Values: []string{literal(f.Tags[k])}})
	}
	return out
}

// matches checks what the filters asked for again: a compatible cloud that
// ignores a filter must not hand the staging engine another's objects.
func matches(id string, tags map[string]string, f cloud.Filter) bool {
	if len(f.IDs) > 0 && !slices.Contains(f.IDs, id) {
		return false
	}
	return cloud.MatchesTags(tags, f.Tags)
}

// tagSpecs tags each of the resource types a call creates; nil without
// tags, since EC2 refuses a TagSpecification without any.
func tagSpecs(tags map[string]string, kinds ...types.ResourceType) []types.TagSpecification {
	if len(tags) == 0 {
		return nil
	}
	var ts []types.Tag
	for _, k := range slices.Sorted(maps.Keys(tags)) {
		ts = append(ts, types.Tag{Key: aws.String(k), Value: aws.String(tags[k])})
	}
	out := make([]types.TagSpecification, len(kinds))
	for i, kind := range kinds {
		out[i] = types.TagSpecification{ResourceType: kind, Tags: ts}
	}
	return out
}

// fromTags turns EC2's tags into a map; when EC2 answered none, asked is
// what the call asked for (some answers leave tags out).
func fromTags(tags []types.Tag, asked map[string]string) map[string]string {
	if len(tags) == 0 {
		return maps.Clone(asked)
	}
	out := make(map[string]string, len(tags))
	for _, t := range tags {
		out[aws.ToString(t.Key)] = aws.ToString(t.Value)
	}
	return out
}

// ec2Token fits a caller's idempotency token to EC2's rule, at most 64
// ASCII characters: a longer or non-ASCII one is hashed, the same way
// every time, so that a retry still names the same creation. An empty one
// stays empty and the SDK fills in a random token, which keeps its own
// retries of one call idempotent.
func ec2Token(token string) *string {
	if token == "" {
		return nil
	}
	ascii := !strings.ContainsFunc(token, func(r rune) bool { return r < 0x21 || r > 0x7e })
	if len(token) <= 64 && ascii {
		return aws.String(token)
	}
	sum := sha256.Sum256([]byte(token))
	return aws.String("hangar-" + hex.EncodeToString(sum[:24]))
}

func toVolume(v types.Volume) cloud.Volume {
	out := cloud.Volume{
		ID:         aws.ToString(v.VolumeId),
		State:      volumeState(v.State),
		SizeGB:     int(aws.ToInt32(v.Size)),
		Zone:       aws.ToString(v.AvailabilityZone),
		SnapshotID: aws.ToString(v.SnapshotId),
		Tags:       fromTags(v.Tags, nil),
	}
	if v.CreateTime != nil {
		out.CreatedAt = *v.CreateTime
	}
	// Volumes are attached to one instance at a time here (no
	// multi-attach); a detached attachment is history.
	for _, a := range v.Attachments {
		if a.State == types.VolumeAttachmentStateDetached {
			continue
		}
		out.InstanceID = aws.ToString(a.InstanceId)
		out.Device = aws.ToString(a.Device)
		out.AttachmentState = string(a.State)
		break
	}
	return out
}

// volumeState translates EC2's volume state.
func volumeState(s types.VolumeState) string {
	switch s {
	case types.VolumeStateCreating:
		// Being made, from a snapshot perhaps; not yet attachable.
		return cloud.VolumeCreating
	case types.VolumeStateAvailable:
		// Ready and attached to nothing.
		return cloud.VolumeAvailable
	case types.VolumeStateInUse:
		// Attached, or being attached or detached: see AttachmentState.
		return cloud.VolumeInUse
	case types.VolumeStateDeleting, types.VolumeStateDeleted:
		// Going or gone.
		return cloud.VolumeDeleting
	case types.VolumeStateError:
		// EC2 failed to make it; it will not become available.
		return cloud.VolumeError
	default:
		// A state this code does not know, passed on for the logs; the
		// caller sees it is none of the above and waits.
		return string(s)
	}
}

func toSnapshot(s types.Snapshot) cloud.Snapshot {
	out := cloud.Snapshot{
		ID:          aws.ToString(s.SnapshotId),
		VolumeID:    aws.ToString(s.VolumeId),
		State:       snapshotState(s.State),
		Progress:    aws.ToString(s.Progress),
		SizeGB:      int(aws.ToInt32(s.VolumeSize)),
		Description: aws.ToString(s.Description),
		Tags:        fromTags(s.Tags, nil),
	}
	if s.StartTime != nil {
		out.StartedAt = *s.StartTime
	}
	return out
}

// snapshotState translates EC2's snapshot state.
func snapshotState(s types.SnapshotState) string {
	switch s {
	case types.SnapshotStatePending, types.SnapshotStateRecovering:
		// Being taken or copied, or restored from the recycle bin.
		return cloud.SnapshotPending
	case types.SnapshotStateCompleted:
		// Usable: volumes and images can be made from it.
		return cloud.SnapshotCompleted
	case types.SnapshotStateError:
		// EC2 failed to take it; it will not complete.
		return cloud.SnapshotError
	default:
		// "recoverable" (in the recycle bin) or a state this code does not
		// know: passed on, and not usable.
		return string(s)
	}
}

func toCloudImage(im types.Image) cloud.Image {
	out := cloud.Image{
		ID:           aws.ToString(im.ImageId),
		Name:         aws.ToString(im.Name),
		Description:  aws.ToString(im.Description),
		State:        imageState(im.State),
		Architecture: string(im.Architecture),
		RootDevice:   aws.ToString(im.RootDeviceName),
		Tags:         fromTags(im.Tags, nil),
	}
	for _, b := range im.BlockDeviceMappings {
		// Instance-store and suppressed devices have no snapshot to stage.
		if b.Ebs == nil {
			continue
		}
		out.Devices = append(out.Devices, cloud.BlockDevice{
			Device:     aws.ToString(b.DeviceName),
			SnapshotID: aws.ToString(b.Ebs.SnapshotId),
			SizeGB:     int(aws.ToInt32(b.Ebs.VolumeSize)),
		})
	}
	if t := aws.ToString(im.CreationDate); t != "" {
		if created, err := time.Parse(time.RFC3339Nano, t); err == nil {
			out.CreatedAt = created
		}
	}
	return out
}

// imageState translates EC2's image state.
func imageState(s types.ImageState) string {
	switch s {
	case types.ImageStatePending, types.ImageStateTransient:
		// Being created, registered or copied.
		return cloud.ImagePending
	case types.ImageStateAvailable:
		// Launchable.
		return cloud.ImageAvailable
	case types.ImageStateFailed, types.ImageStateError, types.ImageStateInvalid:
		// EC2 gave up on it; it will not become available.
		return cloud.ImageFailed
	default:
		// "deregistered", "disabled" or a state this code does not know:
		// passed on, and not launchable.
		return string(s)
	}
}

// Tag adds tags to a volume, snapshot or image.
func (p *Provider) Tag(ctx context.Context, id string, tags map[string]string) error {
	if id == "" || len(tags) == 0 {
		return errors.New("tagging an ec2 resource: an id and at least one tag are needed")
	}
	spec := tagSpecs(tags, types.ResourceTypeVolume)
	_, err := p.api.CreateTags(ctx, &ec2.CreateTagsInput{Resources: []string{id}, Tags: spec[0].Tags})
	return wrapErr("tagging "+id, err)
}
