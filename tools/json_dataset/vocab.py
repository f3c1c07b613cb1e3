"""The words records are made of, each list split into a training pool and a "novel" pool.

`split_pool` sends every fourth entry to the novel pool before anything is generated, so the
novel split's names, cities, items, products, symptoms, medicines, issues and urgency cues never
occur in training. Names are composed from given and family names split the same way, so a
novel name has a given name and a family name that training never saw.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")
NOVEL_EVERY = 4  # every 4th entry of each list is held back for the novel split


def split_pool(values: list[T] | tuple[T, ...]) -> dict[str, list[T]]:
    """{"train": 3 of every 4 entries, "novel": the 4th}; the order of the list decides."""
    return {"train": [v for i, v in enumerate(values) if i % NOVEL_EVERY != NOVEL_EVERY - 1],
            "novel": [v for i, v in enumerate(values) if i % NOVEL_EVERY == NOVEL_EVERY - 1]}


# ---------------------------------------------------------------- names
# Latin-script names by culture: (given names, family names), written given-first as in English text.
LATIN_NAMES = {
    "anglo": (["Emily", "James", "Olivia", "Thomas", "Hannah", "George", "Lucy", "Oliver", "Grace", "Henry", "Chloe", "Samuel"],
              ["Walker", "Bennett", "Hughes", "Turner", "Cooper", "Fletcher", "Parker", "Ward", "Morgan", "Ellis", "Baxter", "Holt"]),
    "hispanic": (["Lucía", "Mateo", "Valentina", "Santiago", "Camila", "Diego", "Sofía", "Alejandro"],
                 ["García", "Fernández", "López", "Morales", "Ramírez", "Castillo", "Herrera", "Vargas"]),
    "indian": (["Priya", "Arjun", "Ananya", "Rohan", "Kavya", "Vikram", "Meera", "Aditya"],
               ["Sharma", "Iyer", "Reddy", "Nair", "Kapoor", "Banerjee", "Desai", "Menon"]),
    "west_african": (["Chinedu", "Adaeze", "Oluwaseun", "Ngozi", "Kwame", "Ama", "Tunde", "Folake"],
                     ["Okafor", "Adeyemi", "Mensah", "Okonkwo", "Boateng", "Eze", "Afolabi", "Owusu"]),
    "arabic": (["Omar", "Layla", "Youssef", "Fatima", "Karim", "Nour", "Hassan", "Amira"],
               ["Haddad", "Mansour", "Khalil", "Nasser", "Saleh", "Farouk", "Aziz", "Rahman"]),
    "japanese": (["Haruto", "Yui", "Kenji", "Sakura", "Takeshi", "Aiko", "Ren", "Emi"],
                 ["Tanaka", "Sato", "Yamamoto", "Kobayashi", "Watanabe", "Nakamura", "Ishikawa", "Fujita"]),
    "korean": (["Minjun", "Seoyeon", "Jiwoo", "Hyejin", "Dohyun", "Soojin", "Taeyang", "Eunji"],
               ["Kim", "Park", "Choi", "Jung", "Kang", "Yoon", "Jang", "Lim"]),
    "vietnamese": (["Linh", "Minh", "Thao", "Quang", "Huong", "Duc", "Mai", "Tuan"],
                   ["Nguyen", "Tran", "Pham", "Hoang", "Vu", "Dang", "Bui", "Ngo"]),
    "german": (["Lukas", "Anna", "Felix", "Greta", "Maximilian", "Lena", "Jonas", "Frieda"],
               ["Müller", "Schneider", "Fischer", "Becker", "Hoffmann", "Schäfer", "Koch", "Richter"]),
    "french": (["Camille", "Hugo", "Manon", "Louis", "Élise", "Théo", "Inès", "Julien"],
               ["Dubois", "Lefèvre", "Moreau", "Laurent", "Girard", "Bonnet", "Mercier", "Fontaine"]),
    "slavic": (["Dmitri", "Olga", "Piotr", "Katarzyna", "Ivan", "Natalia", "Tomasz", "Irina"],
               ["Ivanov", "Kowalski", "Petrova", "Nowak", "Sokolov", "Wiśniewska", "Volkov", "Zielinski"]),
    "turkish_persian": (["Emre", "Elif", "Arash", "Zeynep", "Dariush", "Shirin", "Murat", "Yasmin"],
                        ["Yılmaz", "Demir", "Tehrani", "Şahin", "Karimi", "Aydın", "Moradi", "Kaya"]),
    "nordic_dutch": (["Astrid", "Lars", "Sanne", "Erik", "Ingrid", "Daan", "Freya", "Sven"],
                     ["Johansson", "de Vries", "Lindqvist", "van Dijk", "Andersen", "Bakker", "Nilsson", "Jansen"]),
    "east_african": (["Amani", "Baraka", "Wanjiru", "Otieno", "Zawadi", "Kamau", "Neema", "Juma"],
                     ["Odhiambo", "Mwangi", "Achieng", "Kiprono", "Njoroge", "Wafula", "Mutua", "Chebet"]),
}
# Full names in their own script, used in English records now and then.
NATIVE_SCRIPT_NAMES = ["Олег Смирнов", "Νίκος Παπαδάκης", "김서연", "松本葵", "Анна Кузнецова", "أحمد منصور",
                       "Γιώργος Αλεξίου", "박지훈", "प्रिया शर्मा", "Мария Волкова", "이하준", "山本健太",
                       "Ελένη Μαρκου", "Сергей Орлов", "최유나", "高橋蓮"]

ZH_SURNAMES = ["王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
               "何", "林", "罗", "高", "郑", "梁", "谢", "宋", "唐", "许", "韩", "冯", "邓", "曹", "彭", "曾",
               "萧", "田", "董", "潘", "袁", "蔡", "蒋", "余", "欧阳", "司马", "上官", "诸葛"]
ZH_GIVEN = ["伟", "芳", "秀英", "敏", "静", "磊", "洋", "艳", "勇", "军", "杰", "娟", "涛", "明", "超", "霞",
            "平", "刚", "桂英", "晓东", "雨桐", "子轩", "欣怡", "浩然", "梓涵", "思远", "佳怡", "宇航",
            "诗涵", "俊杰", "嘉豪", "一诺", "婉清", "志强", "海燕", "建国", "丽娟", "文博", "若曦", "天佑",
            "梦瑶", "博文", "晨阳", "雅琴", "国栋", "慧敏", "振华", "雪梅"]
# Foreign names in Chinese transliteration ("玛丽亚·加西亚") and Japanese names in kanji.
ZH_FOREIGN_GIVEN = ["玛丽亚", "约翰", "安娜", "大卫", "苏菲", "彼得", "艾米丽", "托马斯", "露西", "亚历山大",
                    "娜塔莎", "卡洛斯"]
ZH_FOREIGN_FAMILY = ["加西亚", "史密斯", "穆勒", "佩特罗夫", "罗西", "杜邦", "威尔逊", "汉森", "费尔南德斯",
                     "科瓦尔斯基", "奥康纳", "贝克"]
JA_FAMILY = ["山田", "佐藤", "铃木", "高桥", "田中", "渡边", "伊藤", "中村"]
JA_GIVEN = ["太郎", "美咲", "健太", "由美", "直树", "阳菜", "翔太", "莉子"]

# ---------------------------------------------------------------- places and things
CITIES = {
    "en": ["Lisbon", "Nairobi", "Osaka", "Toronto", "Munich", "Lagos", "Auckland", "Bogotá", "Krakow", "Denver",
           "Marseille", "Hanoi", "Leeds", "Casablanca", "Glasgow", "Pittsburgh", "Cape Town", "Manila", "Porto",
           "Ottawa", "Seville", "Kyoto", "Accra", "Winnipeg", "Rotterdam", "Brisbane", "Dubai", "Helsinki",
           "Montreal", "Chennai", "Edinburgh", "Phoenix", "Lyon", "Busan", "Valparaíso", "Zurich",
           "Valencia", "Cairo", "Perth", "Bangalore", "Vienna", "Nashville", "Reykjavik", "Antwerp", "Durban",
           "Gdansk", "Istanbul", "Halifax", "Stockholm", "Kuala Lumpur", "Milan", "Tbilisi", "Quito", "Bristol",
           "Sapporo", "Seattle", "Dakar", "Hamburg", "Lima", "Calgary", "Athens", "Jakarta", "Minneapolis",
           "Salzburg", "Mumbai", "Oslo", "Wellington", "Riga", "Montevideo", "Taipei", "Cork", "Kampala"],
    "zh": ["上海", "北京", "广州", "深圳", "杭州", "成都", "南京", "武汉", "西安", "苏州", "重庆", "厦门",
           "青岛", "大连", "长沙", "郑州", "昆明", "合肥", "福州", "济南", "哈尔滨", "沈阳", "天津", "宁波",
           "无锡", "贵阳", "南宁", "兰州", "乌鲁木齐", "拉萨", "海口", "珠海", "佛山", "东莞", "温州", "绍兴",
           "烟台", "洛阳", "桂林", "三亚", "呼和浩特", "石家庄", "太原", "南昌", "香港", "澳门", "台北", "高雄",
           "东京", "大阪", "首尔", "新加坡", "曼谷", "伦敦", "巴黎", "柏林", "纽约", "悉尼", "温哥华", "多伦多",
           "吉隆坡", "迪拜", "莫斯科", "墨尔本", "旧金山", "米兰"],
}
# Items with an optional measure word: English ("pairs" in "3 pairs of running shoes") or Chinese (台, 把, …).
ITEMS = {
    "en": [("desk lamp", ""), ("running shoes", "pairs"), ("printer paper", "reams"), ("office chair", ""),
           ("AA batteries", "packs"), ("green tea", "boxes"), ("water bottle", ""), ("olive oil", "bottles"),
           ("wireless keyboard", ""), ("coffee beans", "bags"), ("yoga mat", ""), ("wool socks", "pairs"),
           ("HDMI cable", ""), ("ballpoint pens", "boxes"), ("standing desk", ""), ("paper towels", "rolls"),
           ("bluetooth speaker", ""), ("sparkling water", "cases"), ("ceramic mug", ""), ("garden gloves", "pairs"),
           ("laptop sleeve", ""), ("sticky notes", "packs"), ("air purifier", ""), ("dish soap", "bottles"),
           ("webcam", ""), ("rice", "bags"), ("hiking backpack", ""), ("screws", "boxes"), ("electric kettle", ""),
           ("masking tape", "rolls"), ("monitor stand", ""), ("cat food", "cans"), ("phone charger", ""),
           ("trash bags", "packs"), ("table fan", ""), ("notebooks", "sets"), ("rain jacket", ""),
           ("light bulbs", "packs"), ("cutting board", ""), ("orange juice", "cartons"), ("dumbbells", "pairs"),
           ("bath towels", "sets"), ("power strip", ""), ("flour", "sacks"), ("bike helmet", ""),
           ("face masks", "boxes"), ("USB hub", ""), ("candles", "packs"), ("frying pan", ""), ("pasta", "packets"),
           ("tablet case", ""), ("shampoo", "bottles"), ("alarm clock", ""), ("printer ink", "cartridges"),
           ("sleeping bag", ""), ("dog treats", "bags"), ("tripod", ""), ("wine glasses", "sets"),
           ("space heater", ""), ("cotton T-shirts", "packs")],
    "zh": [("笔记本电脑", "台"), ("办公椅", "把"), ("台灯", "盏"), ("无线鼠标", "个"), ("保温杯", "个"), ("运动鞋", "双"),
           ("打印纸", "包"), ("电水壶", "个"), ("瑜伽垫", "张"), ("双肩包", "个"), ("显示器", "台"), ("咖啡机", "台"),
           ("蓝牙耳机", "副"), ("数据线", "根"), ("绿茶", "盒"), ("橄榄油", "瓶"), ("大米", "袋"), ("毛巾", "条"),
           ("雨伞", "把"), ("羊毛袜", "双"), ("空气净化器", "台"), ("圆珠笔", "支"), ("洗洁精", "瓶"), ("书桌", "张"),
           ("充电宝", "个"), ("卫生纸", "提"), ("电风扇", "台"), ("保鲜盒", "套"), ("牛奶", "箱"), ("剪刀", "把"),
           ("移动硬盘", "块"), ("床单", "条"), ("茶杯", "只"), ("电池", "节"), ("沙发垫", "个"), ("记事本", "本"),
           ("插线板", "个"), ("矿泉水", "箱"), ("平底锅", "口"), ("面粉", "袋"), ("自行车头盔", "顶"), ("口罩", "盒"),
           ("路由器", "台"), ("蜡烛", "根"), ("菜刀", "把"), ("洗发水", "瓶"), ("闹钟", "个"), ("墨盒", "个"),
           ("睡袋", "个"), ("狗粮", "袋"), ("三脚架", "个"), ("红酒杯", "套"), ("电暖器", "台"), ("T恤", "件"),
           ("羽绒服", "件"), ("台历", "本"), ("螺丝刀", "把"), ("花盆", "个"), ("键盘", "个"), ("窗帘", "副")],
}
PRODUCTS = {
    "en": ["Kindle Paperwhite", "Pixel 8", "AirPods Pro", "ThinkPad X1", "Galaxy Tab S9", "Echo Dot", "Surface Laptop 5",
           "Switch OLED", "Fitbit Charge 6", "Roku Ultra", "MacBook Air", "Sonos One", "GoPro Hero 12", "Dyson V15",
           "Nest Thermostat", "Garmin Forerunner 265", "Xbox Series S", "Canon EOS R50", "Bose QC45", "iPad Mini",
           "Galaxy S24", "Ring Doorbell", "Steam Deck", "Apple Watch SE", "Logitech MX Master 3", "Kobo Clara",
           "Philips Hue Bridge", "OnePlus 12", "Dell XPS 13", "Instant Pot Duo", "Oculus Quest 3", "HP LaserJet M110",
           "Moto G Power", "Brother HL-L2350", "Nintendo Switch Lite", "Sony WH-1000XM5", "Roomba j7",
           "Chromebook Flex", "Anker PowerCore", "Tile Mate", "Asus ZenBook 14", "Xiaomi Redmi Note 13",
           "Eufy Cam 3", "JBL Flip 6", "Lenovo Tab P11", "Nothing Phone 2", "Acer Aspire 5", "Keurig K-Mini"],
    "zh": ["华为MatePad", "小米手环8", "AirPods Pro", "iPhone 15", "联想小新", "大疆Mini 4", "美的空调", "海尔冰箱",
           "Kindle", "OPPO Reno", "荣耀Magic6", "vivo X100", "格力风扇", "小米电视", "华为Watch GT4", "科沃斯扫地机",
           "苏泊尔电饭煲", "戴森吹风机", "索尼PS5", "佳能相机", "小天才手表", "九阳豆浆机", "iPad Air", "惠普打印机",
           "飞利浦剃须刀", "米家台灯", "海信电视", "一加12", "红米K70", "华为FreeBuds", "美的洗碗机", "腾讯极光盒子",
           "天猫精灵", "小度音箱", "雷蛇鼠标", "罗技键盘", "三星Galaxy S24", "松下微波炉", "西门子洗衣机", "石头扫地机",
           "Switch游戏机", "华硕天选", "魅族21", "膳魔师保温杯", "大疆Osmo", "小米路由器"],
}
SYMPTOMS = {
    "en": ["persistent cough", "chest pain", "shortness of breath", "severe headache", "dizziness", "lower back pain",
           "high fever", "nausea", "fatigue", "joint pain", "sore throat", "blurred vision", "abdominal cramps",
           "skin rash", "ringing in the ears", "heart palpitations", "numbness in the left hand", "loss of appetite",
           "swollen ankles", "night sweats", "frequent urination", "chronic insomnia", "ear pain", "wheezing",
           "stiff neck", "heartburn", "muscle weakness", "itchy eyes", "nosebleeds", "knee swelling",
           "dry mouth", "tingling feet", "chills", "constipation", "hoarse voice", "shoulder pain",
           "runny nose", "vomiting", "memory lapses", "hip pain"],
    "zh": ["持续咳嗽", "胸痛", "呼吸急促", "剧烈头痛", "头晕", "腰痛", "高烧", "恶心", "乏力", "关节痛", "咽喉痛",
           "视力模糊", "腹部绞痛", "皮疹", "耳鸣", "心悸", "左手麻木", "食欲不振", "脚踝水肿", "盗汗", "尿频", "失眠",
           "耳痛", "喘息", "颈部僵硬", "胃灼热", "肌肉无力", "眼睛发痒", "流鼻血", "膝盖肿胀", "口干", "脚底刺痛",
           "发冷", "便秘", "声音嘶哑", "肩膀疼痛", "流鼻涕", "呕吐", "记忆力减退", "髋部疼痛"],
}
MEDICATIONS = {
    "en": ["amlodipine", "lisinopril", "metformin", "ibuprofen", "paracetamol", "atorvastatin", "omeprazole",
           "amoxicillin", "losartan", "aspirin", "sertraline", "levothyroxine", "prednisone", "cetirizine",
           "gabapentin", "azithromycin", "hydrochlorothiazide", "simvastatin", "pantoprazole", "montelukast",
           "naproxen", "clopidogrel", "doxycycline", "furosemide", "loratadine", "tramadol", "insulin glargine",
           "salbutamol", "warfarin", "ranitidine", "diclofenac", "fluoxetine", "metoprolol", "ciprofloxacin",
           "melatonin", "bisoprolol", "famotidine", "cefalexin", "valsartan", "budesonide"],
    "zh": ["氨氯地平", "赖诺普利", "二甲双胍", "布洛芬", "对乙酰氨基酚", "阿托伐他汀", "奥美拉唑", "阿莫西林", "氯沙坦",
           "阿司匹林", "舍曲林", "左甲状腺素", "泼尼松", "西替利嗪", "加巴喷丁", "阿奇霉素", "氢氯噻嗪", "辛伐他汀",
           "泮托拉唑", "孟鲁司特", "萘普生", "氯吡格雷", "多西环素", "呋塞米", "氯雷他定", "曲马多", "甘精胰岛素",
           "沙丁胺醇", "华法林", "连花清瘟胶囊", "双氯芬酸", "氟西汀", "美托洛尔", "环丙沙星", "褪黑素", "比索洛尔",
           "法莫替丁", "头孢氨苄", "缬沙坦", "布地奈德"],
}
ISSUES = {
    "en": ["fast battery drain", "screen flickering", "no power at all", "Wi-Fi dropouts", "loose charging port",
           "crackling speaker", "app crashes on launch", "unresponsive touchscreen", "overheating",
           "Bluetooth pairing failures", "a cracked hinge", "random reboots", "dead pixels", "a stuck power button",
           "slow charging", "no sound from the left earbud", "a frozen firmware update", "a blinking red light",
           "GPS not locking", "a rattling fan", "keys that stop working", "a blurry camera", "error code E42",
           "the lid not closing", "a burning smell", "a swollen battery", "ghost touches", "a failed login loop",
           "sync errors", "a leaking water tank", "weak suction", "a noisy motor", "the display turning pink",
           "a missing remote", "app connection failures", "a drifting joystick", "uneven heating",
           "a broken strap", "paper jams", "the volume resetting"],
    "zh": ["电池耗电快", "屏幕闪烁", "无法开机", "Wi-Fi频繁断开", "充电口松动", "扬声器有杂音", "应用闪退", "触摸屏失灵",
           "机身过热", "蓝牙无法配对", "转轴开裂", "自动重启", "屏幕有坏点", "电源键卡住", "充电很慢", "左耳没有声音",
           "固件升级卡住", "红灯一直闪", "定位不准", "风扇异响", "按键失灵", "拍照模糊", "报错E42", "盖子合不上",
           "有烧焦味", "电池鼓包", "屏幕乱跳", "登录一直失败", "数据无法同步", "水箱漏水", "吸力变弱", "电机噪音大",
           "屏幕发粉", "遥控器丢失", "连不上App", "摇杆漂移", "加热不均匀", "表带断了", "经常卡纸", "音量自动重置"],
}
# Urgency cues imply the priority (no cue names the field); some low cues say "urgent"/"紧急" on purpose.
PRIORITY_CUES = {
    "en": {"high": ["This is urgent.", "Need a fix ASAP.", "It is critical for our business.", "Please escalate immediately.",
                    "Our whole team is blocked.", "Top priority, please!", "We are losing sales every hour.",
                    "Please treat this as an emergency.", "Needs to be solved today.", "This is extremely urgent.",
                    "Please fix this right away.", "It is a showstopper for us."],
           "medium": ["Please look into it this week.", "Moderately important.", "Would like a fix soon-ish.",
                      "Normal priority.", "A fix in the next few days would be good.", "Medium priority.",
                      "Not an emergency, but please don't forget it.", "Somewhat annoying.",
                      "Please handle it in the usual time.", "It is a moderate problem.",
                      "Would appreciate a fix within the week.", "Standard priority."],
           "low": ["No rush.", "Whenever you have time.", "Low priority.", "Not urgent at all.", "Just letting you know.",
                   "It can wait until next month.", "Minor issue, no hurry.", "It is only cosmetic.",
                   "Take your time.", "Not a big deal.", "No hurry at all.", "It can wait."]},
    "zh": {"high": ["紧急！", "非常紧急，请马上处理。", "十万火急。", "请立即升级处理。", "整个团队都被卡住了。",
                    "最高优先级！", "每小时都在损失订单。", "请按紧急情况处理。", "今天必须解决。", "特别紧急。",
                    "请马上修复。", "严重影响业务。"],
           "medium": ["请这周内处理。", "一般优先级。", "希望近期能修好。", "优先级中等。", "这几天内修好就行。",
                      "中等优先级。", "不算紧急，但别忘了。", "有点影响使用。", "请按正常流程处理。", "问题不大不小。",
                      "希望一周内解决。", "普通优先级。"],
           "low": ["不急。", "有空再看就行。", "优先级低。", "一点都不紧急。", "只是告诉你们一声。", "下个月再处理也行。",
                   "小问题，不着急。", "只是外观问题。", "慢慢来。", "问题不大。", "完全不急。", "可以以后再说。"]},
}


def latin_name_pools() -> dict[str, list[tuple[list[str], list[str]]]]:
    """Per split, one (given names, family names) pair per culture."""
    pools: dict[str, list[tuple[list[str], list[str]]]] = {"train": [], "novel": []}
    for given, family in LATIN_NAMES.values():
        g, f = split_pool(given), split_pool(family)
        for split in pools:
            pools[split].append((g[split], f[split]))
    return pools
