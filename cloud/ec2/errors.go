package ec2

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"slices"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/hangar-ci/hangar/cloud"
)

// EC2 error codes by the class the pool decides on. The lists come from
// the EC2 API reference's error codes page; EC2-compatible clouds reuse them.
var (
	// capacityCodes: this (type, zone or subnet, market) offering cannot be
	// had now; another may. Spot refusals are here because on-demand (or
	// another spot pool) is the remedy.
	capacityCodes = []string{
		"InsufficientInstanceCapacity",
		"InsufficientCapacity",
		"InsufficientHostCapacity",
		"InsufficientReservedInstanceCapacity",
		"InsufficientFreeAddressesInSubnet",
		"Unsupported", // the type is not offered in this zone
		"SpotMaxPriceTooLow",
		"MaxSpotInstanceCountExceeded",
		"InsufficientVolumeCapacity", // no EBS capacity of this type in the zone
	}
	// quotaCodes: an account limit. Other offerings hit the same limit, and
	// retrying only adds load, so launching stops until an operator acts.
	quotaCodes = []string{
		"InstanceLimitExceeded",
		"VcpuLimitExceeded",
		"VolumeLimitExceeded",
		"MaxIOPSLimitExceeded",
		"SnapshotLimitExceeded",
		"ResourceLimitExceeded", // e.g. concurrent snapshot or image copies
		"PendingVerification",   // new account or region still being validated
	}
	// throttleCodes: EC2's and compatible clouds' ways to say "slow down".
	throttleCodes = []string{
		"RequestLimitExceeded",
		"Throttling",
		"ThrottlingException",
		"RequestThrottled",
		"RequestThrottledException",
		"TooManyRequestsException",
		"SlowDown",
		// Too many snapshots of one volume in flight: wait, then the same
		// request succeeds.
		"SnapshotCreationPerVolumeRateExceeded",
	}
	// notFoundCodes: the instance, image, volume, snapshot or key pair does
	// not exist, or its id cannot name one.
	notFoundCodes = []string{
		"InvalidInstanceID.NotFound",
		"InvalidInstanceID.Malformed",
		"InvalidAMIID.NotFound",
		"InvalidAMIID.Malformed",
		"InvalidAMIID.Unavailable",
		"InvalidVolume.NotFound",
		"InvalidVolumeID.Malformed",
		"InvalidSnapshot.NotFound",
		"InvalidSnapshotID.Malformed",
		"InvalidKeyPair.NotFound",
	}
	// instanceStateCodes: EC2 rejects a whole batch because of one
	// instance's state or kind (a stop of a terminated or spot instance).
	instanceStateCodes = []string{
		"IncorrectInstanceState",
		"UnsupportedOperation",
		"OperationNotPermitted",
	}
)

// classOf returns the cloud error class of an EC2 error code, or nil when
// the code has none.
func classOf(code string) error {
	switch {
	case code == "":
		return nil
	case slices.Contains(capacityCodes, code):
		return cloud.ErrCapacity
	case slices.Contains(quotaCodes, code):
		return cloud.ErrQuota
	case slices.Contains(throttleCodes, code):
		return cloud.ErrThrottled
	case slices.Contains(notFoundCodes, code):
		return cloud.ErrNotFound
	}
	return nil
}

// errorCode returns the EC2 error code in err, or "".
func errorCode(err error) string {
	if ae, ok := errors.AsType[smithy.APIError](err); ok {
		return ae.ErrorCode()
	}
	return ""
}

// errorMessage returns EC2's message in err, or "".
func errorMessage(err error) string {
	if ae, ok := errors.AsType[smithy.APIError](err); ok {
		return ae.ErrorMessage()
	}
	return ""
}

// requestCode names the outcome of one request for metrics: EC2's error
// code, "" for success, or a word for failures that never reached EC2.
func requestCode(err error) string {
	if err == nil {
		return ""
	}
	if code := errorCode(err); code != "" {
		return code
	}
	switch {
	case errors.Is(err, context.Canceled):
		return "Canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "Timeout"
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return "Timeout"
	}
	return "RequestError"
}

// uncertain reports whether err leaves open whether EC2 acted on the
// request: the response was lost, or EC2 failed on its side. Retrying a
// launch after such an error must reuse the same client token, and must
// not move on to another offering.
func uncertain(err error) bool {
	if err == nil {
		return false
	}
	code := errorCode(err)
	switch class := classOf(code); {
	case errors.Is(class, cloud.ErrThrottled):
		return true // rejected, but the same request is the right next step
	case errors.Is(class, cloud.ErrCapacity), errors.Is(class, cloud.ErrQuota), errors.Is(class, cloud.ErrNotFound):
		return false // EC2 said no, whatever the HTTP status
	}
	if code == "" {
		return true // transport error or timeout: the request may have landed
	}
	if re, ok := errors.AsType[*awshttp.ResponseError](err); ok {
		return re.HTTPStatusCode() >= http.StatusInternalServerError
	}
	switch code {
	case "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable":
		return true
	}
	return false
}

// retryable tells the SDK's retryer what it cannot know from the HTTP
// status alone: EC2 sends InsufficientInstanceCapacity with a 500, which
// the SDK would retry on the same offering, when the remedy is the next
// offering; and compatible clouds throttle with codes of their own.
func retryable(err error) aws.Ternary {
	switch class := classOf(errorCode(err)); {
	case errors.Is(class, cloud.ErrCapacity), errors.Is(class, cloud.ErrQuota), errors.Is(class, cloud.ErrNotFound):
		return aws.FalseTernary
	case errors.Is(class, cloud.ErrThrottled):
		return aws.TrueTernary
	}
	return aws.UnknownTernary
}

// ec2Error is an EC2 failure: what was being done, EC2's code and message,
// and the cloud class that errors.Is matches.
type ec2Error struct {
	doing string
	class error // nil: no class
	err   error
}

func (e *ec2Error) Error() string {
	ae, ok := errors.AsType[smithy.APIError](e.err)
	if !ok {
		return e.doing + ": " + e.err.Error()
	}
	msg := fmt.Sprintf("%s: EC2 %s: %s", e.doing, ae.ErrorCode(), ae.ErrorMessage())
	if re, ok := errors.AsType[*awshttp.ResponseError](e.err); ok && re.ServiceRequestID() != "" {
		msg += " (request " + re.ServiceRequestID() + ")"
	}
	return msg
}

func (e *ec2Error) Unwrap() []error {
	if e.class == nil {
		return []error{e.err}
	}
	return []error{e.class, e.err}
}

// wrapErr says what was being done and gives err its cloud class. The
// message holds EC2's code and message, never the request's parameters,
// so user-data cannot leak into logs.
func wrapErr(doing string, err error) error {
	if err == nil {
		return nil
	}
	return &ec2Error{doing: doing, class: classOf(errorCode(err)), err: err}
}

// instanceIDPattern finds instance ids in EC2's messages, e.g. "The
// instance IDs 'i-1a, i-2b' do not exist".
var instanceIDPattern = regexp.MustCompile(`\bi-[0-9a-zA-Z]+\b`)

// idsIn returns the ids of batch that EC2's message about err names.
func idsIn(err error, batch []string) []string {
	var out []string
	for _, id := range instanceIDPattern.FindAllString(errorMessage(err), -1) {
		if slices.Contains(batch, id) && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out
}
