package ec2test

import (
	"encoding/base64"
	"slices"
	"strings"
	"time"
)

// The response shapes, element for element as EC2 writes them. Element names
// come from the locationName of each member in EC2's service model (lists are
// <xSet><item>…</item></xSet>); model_test.go checks every element emitted
// against the botocore copy of that model.

const namespace = "http://ec2.amazonaws.com/doc/2016-11-15/"

// timeFormat is EC2's: millisecond precision, always UTC.
const timeFormat = "2006-01-02T15:04:05.000Z"

func ec2Time(t time.Time) string { return t.UTC().Format(timeFormat) }

// header starts every successful response, after the root element
// <ActionResponse xmlns=…> that writeXML adds.
type header struct {
	RequestID string `xml:"requestId"`
}

func (h *header) setRequestID(id string) { h.RequestID = id }

// errorResponse is EC2's error document. Unlike other query services it has
// no ErrorResponse root and spells RequestID with a capital D.
type errorResponse struct {
	Errors    []errorXML `xml:"Errors>Error"`
	RequestID string     `xml:"RequestID"`
}

type errorXML struct {
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
}

type runInstancesResponse struct {
	header
	reservationXML
}

type describeInstancesResponse struct {
	header
	Reservations []reservationXML `xml:"reservationSet>item"`
	NextToken    string           `xml:"nextToken,omitempty"`
}

type reservationXML struct {
	ReservationID string        `xml:"reservationId"`
	OwnerID       string        `xml:"ownerId"`
	Groups        []groupXML    `xml:"groupSet>item"`
	Instances     []instanceXML `xml:"instancesSet>item"`
}

type groupXML struct {
	GroupID   string `xml:"groupId"`
	GroupName string `xml:"groupName"`
}

type instanceXML struct {
	InstanceID         string             `xml:"instanceId"`
	ImageID            string             `xml:"imageId"`
	State              stateXML           `xml:"instanceState"`
	PrivateDNSName     string             `xml:"privateDnsName"`
	DNSName            string             `xml:"dnsName"`
	Reason             string             `xml:"reason"`
	KeyName            string             `xml:"keyName,omitempty"`
	AmiLaunchIndex     int                `xml:"amiLaunchIndex"`
	InstanceType       string             `xml:"instanceType"`
	LaunchTime         string             `xml:"launchTime"`
	Placement          placementXML       `xml:"placement"`
	Monitoring         monitoringXML      `xml:"monitoring"`
	SubnetID           string             `xml:"subnetId"`
	VpcID              string             `xml:"vpcId"`
	PrivateIPAddress   string             `xml:"privateIpAddress,omitempty"`
	IPAddress          string             `xml:"ipAddress,omitempty"`
	SourceDestCheck    bool               `xml:"sourceDestCheck"`
	Groups             []groupXML         `xml:"groupSet>item"`
	StateReason        *stateReasonXML    `xml:"stateReason,omitempty"`
	Architecture       string             `xml:"architecture"`
	RootDeviceType     string             `xml:"rootDeviceType"`
	RootDeviceName     string             `xml:"rootDeviceName"`
	BlockDevices       []instanceBDMXML   `xml:"blockDeviceMapping>item"`
	InstanceLifecycle  string             `xml:"instanceLifecycle,omitempty"`
	SpotRequestID      string             `xml:"spotInstanceRequestId,omitempty"`
	VirtualizationType string             `xml:"virtualizationType"`
	ClientToken        string             `xml:"clientToken"`
	Tags               []tagXML           `xml:"tagSet>item"`
	Hypervisor         string             `xml:"hypervisor"`
	IamInstanceProfile *iamProfileXML     `xml:"iamInstanceProfile,omitempty"`
	EbsOptimized       bool               `xml:"ebsOptimized"`
	EnaSupport         bool               `xml:"enaSupport"`
	MetadataOptions    metadataOptionsXML `xml:"metadataOptions"`
	PlatformDetails    string             `xml:"platformDetails"`
	UsageOperation     string             `xml:"usageOperation"`
}

type stateXML struct {
	Code int    `xml:"code"`
	Name string `xml:"name"`
}

type placementXML struct {
	AvailabilityZone string `xml:"availabilityZone"`
	GroupName        string `xml:"groupName"`
	Tenancy          string `xml:"tenancy"`
}

type monitoringXML struct {
	State string `xml:"state"`
}

type stateReasonXML struct {
	Code    string `xml:"code"`
	Message string `xml:"message"`
}

type instanceBDMXML struct {
	DeviceName string `xml:"deviceName"`
	Ebs        struct {
		VolumeID            string `xml:"volumeId"`
		Status              string `xml:"status"`
		AttachTime          string `xml:"attachTime"`
		DeleteOnTermination bool   `xml:"deleteOnTermination"`
	} `xml:"ebs"`
}

type tagXML struct {
	Key   string `xml:"key"`
	Value string `xml:"value"`
}

type iamProfileXML struct {
	Arn string `xml:"arn"`
	ID  string `xml:"id"`
}

type metadataOptionsXML struct {
	State                   string `xml:"state"`
	HTTPTokens              string `xml:"httpTokens"`
	HTTPPutResponseHopLimit int    `xml:"httpPutResponseHopLimit"`
	HTTPEndpoint            string `xml:"httpEndpoint"`
	HTTPProtocolIPv6        string `xml:"httpProtocolIpv6"`
	InstanceMetadataTags    string `xml:"instanceMetadataTags"`
}

// stateChangesResponse answers Terminate-, Stop- and StartInstances.
type stateChangesResponse struct {
	header
	Instances []stateChangeXML `xml:"instancesSet>item"`
}

type stateChangeXML struct {
	InstanceID    string   `xml:"instanceId"`
	CurrentState  stateXML `xml:"currentState"`
	PreviousState stateXML `xml:"previousState"`
}

type consoleOutputResponse struct {
	header
	InstanceID string `xml:"instanceId"`
	Timestamp  string `xml:"timestamp"`
	// Output is absent, not empty, while an instance has printed nothing.
	Output string `xml:"output,omitempty"`
}

type describeImagesResponse struct {
	header
	Images []imageXML `xml:"imagesSet>item"`
}

type imageXML struct {
	ImageID            string        `xml:"imageId"`
	ImageLocation      string        `xml:"imageLocation"`
	ImageState         string        `xml:"imageState"`
	ImageOwnerID       string        `xml:"imageOwnerId"`
	CreationDate       string        `xml:"creationDate"`
	IsPublic           bool          `xml:"isPublic"`
	Architecture       string        `xml:"architecture"`
	ImageType          string        `xml:"imageType"`
	Name               string        `xml:"name"`
	Description        string        `xml:"description,omitempty"`
	RootDeviceType     string        `xml:"rootDeviceType"`
	RootDeviceName     string        `xml:"rootDeviceName"`
	BlockDevices       []imageBDMXML `xml:"blockDeviceMapping>item"`
	VirtualizationType string        `xml:"virtualizationType"`
	Hypervisor         string        `xml:"hypervisor"`
	EnaSupport         bool          `xml:"enaSupport"`
	BootMode           string        `xml:"bootMode,omitempty"`
	ImdsSupport        string        `xml:"imdsSupport,omitempty"`
	PlatformDetails    string        `xml:"platformDetails"`
	UsageOperation     string        `xml:"usageOperation"`
	Tags               []tagXML      `xml:"tagSet>item"`
}

type imageBDMXML struct {
	DeviceName string `xml:"deviceName"`
	Ebs        struct {
		SnapshotID          string `xml:"snapshotId"`
		VolumeSize          int    `xml:"volumeSize"`
		DeleteOnTermination bool   `xml:"deleteOnTermination"`
		VolumeType          string `xml:"volumeType"`
		Encrypted           bool   `xml:"encrypted"`
	} `xml:"ebs"`
}

// returnResponse answers the actions that have no output shape in the
// model (CreateTags, DeleteVolume …); EC2 sends this anyway.
type returnResponse struct {
	header
	Return bool `xml:"return"`
}

type instanceAttributeResponse struct {
	header
	InstanceID   string        `xml:"instanceId"`
	UserData     *attrValueXML `xml:"userData,omitempty"`
	InstanceType *attrValueXML `xml:"instanceType,omitempty"`
}

type attrValueXML struct {
	Value string `xml:"value,omitempty"`
}

type availabilityZonesResponse struct {
	header
	Zones []zoneXML `xml:"availabilityZoneInfo>item"`
}

type zoneXML struct {
	ZoneName           string `xml:"zoneName"`
	ZoneState          string `xml:"zoneState"`
	RegionName         string `xml:"regionName"`
	ZoneID             string `xml:"zoneId"`
	OptInStatus        string `xml:"optInStatus"`
	GroupName          string `xml:"groupName"`
	NetworkBorderGroup string `xml:"networkBorderGroup"`
	ZoneType           string `xml:"zoneType"`
}

type importKeyPairResponse struct {
	header
	KeyFingerprint string   `xml:"keyFingerprint"`
	KeyName        string   `xml:"keyName"`
	KeyPairID      string   `xml:"keyPairId"`
	Tags           []tagXML `xml:"tagSet>item"`
}

type describeKeyPairsResponse struct {
	header
	KeyPairs []keyPairXML `xml:"keySet>item"`
}

type keyPairXML struct {
	KeyPairID      string   `xml:"keyPairId"`
	KeyFingerprint string   `xml:"keyFingerprint"`
	KeyName        string   `xml:"keyName"`
	KeyType        string   `xml:"keyType"`
	Tags           []tagXML `xml:"tagSet>item"`
	PublicKey      string   `xml:"publicKey,omitempty"`
	CreateTime     string   `xml:"createTime"`
}

// volumeResponse answers CreateVolume, whose output is a Volume.
type volumeResponse struct {
	header
	volumeXML
}

type describeVolumesResponse struct {
	header
	Volumes   []volumeXML `xml:"volumeSet>item"`
	NextToken string      `xml:"nextToken,omitempty"`
}

type volumeXML struct {
	VolumeID         string          `xml:"volumeId"`
	Size             int             `xml:"size"`
	SnapshotID       string          `xml:"snapshotId"`
	AvailabilityZone string          `xml:"availabilityZone"`
	Status           string          `xml:"status"`
	CreateTime       string          `xml:"createTime"`
	Attachments      []attachmentXML `xml:"attachmentSet>item"`
	Tags             []tagXML        `xml:"tagSet>item"`
	VolumeType       string          `xml:"volumeType"`
	Iops             int             `xml:"iops,omitempty"`
	Throughput       int             `xml:"throughput,omitempty"`
	Encrypted        bool            `xml:"encrypted"`
	MultiAttach      bool            `xml:"multiAttachEnabled"`
}

type attachmentXML struct {
	VolumeID            string `xml:"volumeId"`
	InstanceID          string `xml:"instanceId"`
	Device              string `xml:"device"`
	Status              string `xml:"status"`
	AttachTime          string `xml:"attachTime"`
	DeleteOnTermination bool   `xml:"deleteOnTermination"`
}

// attachmentResponse answers AttachVolume and DetachVolume.
type attachmentResponse struct {
	header
	attachmentXML
}

// snapshotResponse answers CreateSnapshot, whose output is a Snapshot.
type snapshotResponse struct {
	header
	snapshotXML
}

type describeSnapshotsResponse struct {
	header
	Snapshots []snapshotXML `xml:"snapshotSet>item"`
	NextToken string        `xml:"nextToken,omitempty"`
}

type snapshotXML struct {
	SnapshotID  string   `xml:"snapshotId"`
	VolumeID    string   `xml:"volumeId"`
	Status      string   `xml:"status"`
	StartTime   string   `xml:"startTime"`
	Progress    string   `xml:"progress"`
	OwnerID     string   `xml:"ownerId"`
	VolumeSize  int      `xml:"volumeSize"`
	Description string   `xml:"description"`
	Encrypted   bool     `xml:"encrypted"`
	StorageTier string   `xml:"storageTier"`
	Tags        []tagXML `xml:"tagSet>item"`
}

type copySnapshotResponse struct {
	header
	SnapshotID string   `xml:"snapshotId"`
	Tags       []tagXML `xml:"tagSet>item"`
}

// imageIDResponse answers CreateImage, RegisterImage and CopyImage.
type imageIDResponse struct {
	header
	ImageID string `xml:"imageId"`
}

func tagsXML(tags map[string]string) []tagXML {
	if len(tags) == 0 {
		return nil
	}
	out := make([]tagXML, 0, len(tags))
	for k, v := range tags {
		out = append(out, tagXML{Key: k, Value: v})
	}
	slices.SortFunc(out, func(a, b tagXML) int { return strings.Compare(a.Key, b.Key) })
	return out
}

func stateOf(code int) stateXML { return stateXML{Code: code, Name: stateNames[code]} }

// instanceXML renders an instance as Run- and DescribeInstances show it.
// Callers hold s.mu.
func (s *Server) instanceXML(rg *region, in *instance, now time.Time) instanceXML {
	x := instanceXML{
		InstanceID:         in.id,
		ImageID:            in.image,
		State:              stateOf(in.state),
		PrivateDNSName:     in.privateDNS(rg),
		Reason:             in.reason,
		KeyName:            in.keyName,
		AmiLaunchIndex:     in.launchIndex,
		InstanceType:       in.typ,
		LaunchTime:         ec2Time(in.launched),
		Placement:          placementXML{AvailabilityZone: in.zone, Tenancy: "default"},
		Monitoring:         monitoringXML{State: "disabled"},
		SubnetID:           in.subnet,
		VpcID:              vpcID,
		PrivateIPAddress:   in.ip,
		IPAddress:          in.publicIP,
		SourceDestCheck:    true,
		Architecture:       "x86_64",
		RootDeviceType:     "ebs",
		RootDeviceName:     in.rootDevice,
		VirtualizationType: "hvm",
		ClientToken:        in.clientToken,
		Tags:               tagsXML(in.tags),
		Hypervisor:         "xen",
		EnaSupport:         true,
		MetadataOptions: metadataOptionsXML{
			State:                   "applied",
			HTTPTokens:              in.httpTokens,
			HTTPPutResponseHopLimit: in.hopLimit,
			HTTPEndpoint:            in.httpEndpoint,
			HTTPProtocolIPv6:        "disabled",
			InstanceMetadataTags:    "disabled",
		},
		PlatformDetails: "Linux/UNIX",
		UsageOperation:  "RunInstances",
	}
	for _, g := range in.groups {
		x.Groups = append(x.Groups, groupXML{GroupID: g, GroupName: g})
	}
	if in.state == stopped || in.state == stopping || in.state == shuttingDown || in.state == terminated {
		x.StateReason = &stateReasonXML{Code: "Client.UserInitiatedShutdown", Message: "Client.UserInitiatedShutdown: User initiated shutdown"}
	}
	if in.state == terminated {
		// A terminated instance has given up its addresses and disks.
		x.PrivateDNSName, x.PrivateIPAddress, x.IPAddress = "", "", ""
	} else {
		bd := instanceBDMXML{DeviceName: in.rootDevice}
		bd.Ebs.VolumeID, bd.Ebs.Status, bd.Ebs.AttachTime, bd.Ebs.DeleteOnTermination = in.volumeID, "attached", ec2Time(in.created), true
		x.BlockDevices = []instanceBDMXML{bd}
		for _, v := range s.attachedTo(rg, in.id, now) {
			bd := instanceBDMXML{DeviceName: v.attach.device}
			bd.Ebs.VolumeID, bd.Ebs.Status, bd.Ebs.AttachTime = v.id, v.attach.state, ec2Time(v.attach.since)
			x.BlockDevices = append(x.BlockDevices, bd)
		}
	}
	if in.market == marketSpot {
		x.InstanceLifecycle, x.SpotRequestID = "spot", in.spotRequest
	}
	if in.profile != "" {
		x.IamInstanceProfile = &iamProfileXML{Arn: in.profile, ID: in.profileID}
	}
	return x
}

// privateDNS is in's private DNS name, made once: its address and region
// do not change. Callers hold s.mu.
func (in *instance) privateDNS(rg *region) string {
	if in.dnsName == "" {
		in.dnsName = privateDNS(rg.name, in.ip)
	}
	return in.dnsName
}

func privateDNS(region, ip string) string {
	if ip == "" {
		return ""
	}
	host := "ip-" + strings.ReplaceAll(ip, ".", "-")
	if region == "us-east-1" {
		return host + ".ec2.internal"
	}
	return host + "." + region + ".compute.internal"
}

func imageToXML(im *Image) imageXML {
	x := imageXML{
		ImageID:            im.ID,
		ImageLocation:      im.Owner + "/" + im.Name,
		ImageState:         im.State,
		ImageOwnerID:       im.Owner,
		CreationDate:       ec2Time(im.Created),
		Architecture:       im.Architecture,
		ImageType:          "machine",
		Name:               im.Name,
		Description:        im.Description,
		RootDeviceType:     "ebs",
		RootDeviceName:     im.RootDevice,
		VirtualizationType: im.virtualization,
		Hypervisor:         "xen",
		EnaSupport:         im.ena,
		BootMode:           im.bootMode,
		ImdsSupport:        im.imdsSupport,
		PlatformDetails:    "Linux/UNIX",
		UsageOperation:     "RunInstances",
		Tags:               tagsXML(im.Tags),
	}
	for _, d := range im.Devices {
		bd := imageBDMXML{DeviceName: d.Device}
		bd.Ebs.SnapshotID, bd.Ebs.VolumeSize, bd.Ebs.DeleteOnTermination, bd.Ebs.VolumeType = d.SnapshotID, d.SizeGB, d.DeleteOnTermination, d.VolumeType
		x.BlockDevices = append(x.BlockDevices, bd)
	}
	return x
}

func (k *keyPair) xml(withPublicKey bool) keyPairXML {
	x := keyPairXML{
		KeyPairID: k.id, KeyFingerprint: k.fingerprint, KeyName: k.name, KeyType: k.keyType,
		Tags: tagsXML(k.tags), CreateTime: ec2Time(k.created),
	}
	if withPublicKey {
		x.PublicKey = k.publicKey
	}
	return x
}

// xml renders a volume; callers hold mu and have settled it.
func (v *volume) xml() volumeXML {
	x := volumeXML{
		VolumeID: v.id, Size: v.size, SnapshotID: v.snapshot, AvailabilityZone: v.zone,
		Status: v.status(), CreateTime: ec2Time(v.created), Tags: tagsXML(v.tags),
		VolumeType: v.typ, Iops: v.iops, Throughput: v.throughput, Encrypted: v.encrypted,
	}
	if v.attach != nil {
		x.Attachments = []attachmentXML{v.attachmentXML()}
	}
	return x
}

func (v *volume) attachmentXML() attachmentXML {
	return attachmentXML{
		VolumeID: v.id, InstanceID: v.attach.instance, Device: v.attach.device,
		Status: v.attach.state, AttachTime: ec2Time(v.attach.since),
	}
}

// xml renders a snapshot; callers hold mu and have settled it.
func (sn *snapshot) xml(owner string, now time.Time) snapshotXML {
	return snapshotXML{
		SnapshotID: sn.id, VolumeID: sn.volumeID, Status: sn.state, StartTime: ec2Time(sn.started),
		Progress: sn.progress(now), OwnerID: owner, VolumeSize: sn.size, Description: sn.description,
		Encrypted: sn.encrypted, StorageTier: "standard", Tags: tagsXML(sn.tags),
	}
}

func base64Of(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
