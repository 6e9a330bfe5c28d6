import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PublishEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "event_type", "event_time", "user_id", "session_id", "product_id", "transaction_id", "quantity", "price", "amount", "search_query", "page_url", "referrer", "device_type", "ip_address", "country", "properties")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_URL_FIELD_NUMBER: _ClassVar[int]
    REFERRER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    event_time: _timestamp_pb2.Timestamp
    user_id: str
    session_id: str
    product_id: str
    transaction_id: str
    quantity: int
    price: float
    amount: float
    search_query: str
    page_url: str
    referrer: str
    device_type: str
    ip_address: str
    country: str
    properties: _containers.ScalarMap[str, str]
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., product_id: _Optional[str] = ..., transaction_id: _Optional[str] = ..., quantity: _Optional[int] = ..., price: _Optional[float] = ..., amount: _Optional[float] = ..., search_query: _Optional[str] = ..., page_url: _Optional[str] = ..., referrer: _Optional[str] = ..., device_type: _Optional[str] = ..., ip_address: _Optional[str] = ..., country: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("index", "event_id", "status", "reason_code", "message", "field")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[EventResult.Status]
        ACCEPTED: _ClassVar[EventResult.Status]
        REJECTED: _ClassVar[EventResult.Status]
    STATUS_UNSPECIFIED: EventResult.Status
    ACCEPTED: EventResult.Status
    REJECTED: EventResult.Status
    class ReasonCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_CODE_UNSPECIFIED: _ClassVar[EventResult.ReasonCode]
        MISSING_FIELD: _ClassVar[EventResult.ReasonCode]
        INVALID_VALUE: _ClassVar[EventResult.ReasonCode]
        TOO_LARGE: _ClassVar[EventResult.ReasonCode]
        DUPLICATE_IN_BATCH: _ClassVar[EventResult.ReasonCode]
        SCHEMA_VIOLATION: _ClassVar[EventResult.ReasonCode]
    REASON_CODE_UNSPECIFIED: EventResult.ReasonCode
    MISSING_FIELD: EventResult.ReasonCode
    INVALID_VALUE: EventResult.ReasonCode
    TOO_LARGE: EventResult.ReasonCode
    DUPLICATE_IN_BATCH: EventResult.ReasonCode
    SCHEMA_VIOLATION: EventResult.ReasonCode
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    status: EventResult.Status
    reason_code: EventResult.ReasonCode
    message: str
    field: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., status: _Optional[_Union[EventResult.Status, str]] = ..., reason_code: _Optional[_Union[EventResult.ReasonCode, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class PublishEventsResponse(_message.Message):
    __slots__ = ("results", "accepted_count", "rejected_count")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    accepted_count: int
    rejected_count: int
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., accepted_count: _Optional[int] = ..., rejected_count: _Optional[int] = ...) -> None: ...
